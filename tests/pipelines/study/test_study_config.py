"""Study configuration: the shipped studies resolve, and bad input is one clear error before
any trial runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from _study_fakes import MODEL_PARAMS, study_params
from kedro.config import OmegaConfigLoader

from neuroblastoma_cnn.core.errors import DataError, ParameterError
from neuroblastoma_cnn.params import base_parameters
from neuroblastoma_cnn.pipelines.study import config
from neuroblastoma_cnn.pipelines.study.nodes import prepare_study
from neuroblastoma_cnn.trials import engine

PROJECT = Path(__file__).resolve().parents[3]


def _conf(env: str) -> dict:
    loader = OmegaConfigLoader(str(PROJECT / "conf"), base_env="base", default_run_env=env,
                               merge_strategy={"parameters": "soft"})
    return loader["parameters"]


@pytest.mark.parametrize("env", ["base", "tiny"])
def test_every_shipped_study_resolves(env):
    params = _conf(env)
    studies = params["study"]["studies"]
    assert {"dropout", "optimizer", "learning_rate", "l1", "l2", "epochs", "repeated_splits",
            "search"} <= set(studies)
    for name in studies:
        plan = config.resolve_study(params["study"], params, name=name)
        assert plan.name == name and plan.model == params["study"]["model"]
        if plan.mode == "grid":
            assert plan.baseline in plan.variant_names
            if env == "tiny":  # the tiny env runs every study at 2 values x 2 repeats
                assert plan.repeats == 2 and len(plan.variants) == (1 if name ==
                                                                    "repeated_splits" else 2)
    dropout = config.resolve_study(params["study"], params, name="dropout")
    assert dropout.base_params["training"]["learning_rate"] == 0.001  # the study's setting
    optimizer = config.resolve_study(params["study"], params, name="optimizer")
    assert optimizer.baseline == "optimizer=sgd"


def test_variants_and_params():
    plan = config.resolve_study(study_params("sqlite://"), MODEL_PARAMS)
    assert plan.variant_names == ["dropout=0", "dropout=0.25", "dropout=0.5"]
    assert plan.baseline == "dropout=0"
    params = plan.params_for(plan.variant("dropout=0.25").set)
    assert params["model"]["dropout"] == 0.25
    assert MODEL_PARAMS["m"]["model"]["dropout"] == 0.0  # the source is never modified


def test_named_variants_and_factorial():
    named = study_params("sqlite://", reg={
        "mode": "grid", "baseline": "none", "fixed": {"training.learning_rate": 0.001},
        "variants": [{"name": "none", "set": {}}, {"name": "l1", "set": {"model.l1": 1e-4}}]})
    plan = config.resolve_study(named, MODEL_PARAMS)
    assert plan.variant_names == ["none", "l1"]
    assert plan.params_for(plan.variant("l1").set)["training"]["learning_rate"] == 0.001
    grid = study_params("sqlite://", both={
        "mode": "grid", "baseline": "dropout=0,optimizer=sgd",
        "vary": {"model.dropout": [0.0, 0.5], "training.optimizer": ["sgd", "adam"]}})
    assert len(config.resolve_study(grid, MODEL_PARAMS).variants) == 4


@pytest.mark.parametrize(
    ("study", "message"),
    [
        ({"mode": "grid", "vary": {"model.dropuot": [0.1]}, "baseline": "x"},
         "'model.dropuot' is not a parameter of model 'm'"),
        ({"mode": "grid", "vary": {"model.dropout": []}, "baseline": "x"},
         "'model.dropout' has an empty value list"),
        ({"mode": "grid", "vary": {"model.dropout": [0.1, 0.1]}, "baseline": "x"},
         "lists a value twice"),
        ({"mode": "grid", "vary": {"model.dropout": [0.1]}, "baseline": {"model.dropout": 0.3}},
         "matches no variant"),
        ({"mode": "grid", "vary": {"model.dropout": [0.1]}}, "no 'baseline'"),
        ({"mode": "grid", "variants": [], "baseline": "x"}, "empty list"),
        ({"mode": "grid", "vary": {"model.dropout": [0.1]}, "baseline": "dropout=0.1",
          "fixed": {"training.nope": 1}}, "'training.nope' is not a parameter"),
        ({"mode": "search", "n_trials": 3, "pruner": {"n_startup_trials": 1, "n_warmup_steps": 0},
          "space": {"training.learning_rate": {"type": "float", "low": 0, "high": 1,
                                               "log": True}}}, "log range needs 'low' > 0"),
        ({"mode": "search", "n_trials": 3, "space": {}}, "non-empty 'space'"),
        ({"mode": "grid", "vary": {"model.dropout": [0.1]}, "baseline": "dropout=0.1",
          "colour": "red"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_study_definitions(study, message):
    with pytest.raises(ParameterError, match=message) as info:
        config.resolve_study(study_params("sqlite://", bad=study), MODEL_PARAMS)
    assert "\n" not in info.value.one_line()


def test_unknown_study_and_missing_name():
    params = study_params("sqlite://")
    with pytest.raises(ParameterError, match="Unknown study 'dropuot'") as info:
        config.resolve_study(params, MODEL_PARAMS, name="dropuot")
    assert "dropout" in info.value.one_line()  # lists the known studies
    params["name"] = None
    with pytest.raises(ParameterError, match="No study selected"):
        config.resolve_study(params, MODEL_PARAMS)
    params["model"] = "resnet99"
    with pytest.raises(ParameterError, match="model 'resnet99' has no parameters"):
        config.resolve_study(params, MODEL_PARAMS, name="dropout")
    del params["storage"]
    with pytest.raises(ParameterError, match=r"study\.storage: Field required"):
        config.resolve_study(params, MODEL_PARAMS, name="dropout")


@pytest.mark.parametrize(
    "url",
    ["sqlite:////proc/no-such-dir/optuna.db", "nosuchdialect://host/db",
     "postgresql://user:secret@127.0.0.1:1/db"],
)
def test_unreachable_storage_is_one_line(url):
    with pytest.raises(DataError, match="study storage") as info:
        engine.open_storage(url, heartbeat_seconds=1)
    line = info.value.one_line()
    assert "\n" not in line and "secret" not in line


def test_shipped_yaml_parses_as_plain_yaml():
    # the shipped file stays readable by any YAML tool (no OmegaConf-only syntax)
    data = yaml.safe_load((PROJECT / "conf/base/parameters_study.yml").read_text())
    assert data["study"]["workers"] == 1


def test_a_value_the_model_refuses_stops_before_training(tmp_path):
    params = base_parameters()
    study = dict(params["study"], name="bad", storage=f"sqlite:///{tmp_path / 's.db'}")
    study["studies"] = {"bad": {"mode": "grid", "baseline": "optimizer=sgd",
                                "vary": {"training.optimizer": ["sgd", "sgdx"]}}}
    with pytest.raises(ParameterError, match=r"variant optimizer=sgdx.*sgdx") as info:
        prepare_study(study, resnet34=params["resnet34"], resnet50=params["resnet50"])
    assert "\n" not in info.value.one_line()
    study["studies"]["bad"]["vary"] = {"training.optimizer": ["sgd", "adam"]}
    plan = prepare_study(study, resnet34=params["resnet34"], resnet50=params["resnet50"])
    assert plan.variant_names == ["optimizer=sgd", "optimizer=adam"]
    assert (tmp_path / "s.db").exists()  # the storage was opened before any training


@pytest.mark.parametrize("env", ["base", "tiny"])
@pytest.mark.parametrize("name", sorted(base_parameters()["study"]["studies"]))
def test_every_shipped_study_is_validated_into_its_trials(env, name, tmp_path):
    """What `kedro run --pipeline=study --params study.name=<name>` does before its first trial,
    for every shipped study: resolved, every variant (or every end of the search space) parsed
    as the training node's own parameters, the storage opened, the grid laid out. One study runs
    end to end in test_study_pipeline.py (`search`), beside the kill/resume test (`dropout`)."""
    params = _conf(env)
    study = dict(params["study"], name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    plan = prepare_study(study, **{m: params[m] for m in ("resnet34", "resnet50")})
    assert plan.name == name and (tmp_path / "optuna.db").exists()
    spec = params["study"]["studies"][name]
    if plan.mode == "search":
        assert plan.n_trials == spec["n_trials"] and set(plan.space) == set(spec["space"])
        return
    points = engine.grid_points(plan)
    assert len(points) == len(set(points)) == len(plan.variants) * plan.repeats
    assert plan.repeat_scheme == spec.get("repeat_scheme", params["study"]["repeat_scheme"])
    for variant in plan.variants:
        trial_params = plan.params_for(variant.set)
        for path, value in {**spec.get("fixed", {}), **variant.set}.items():
            assert config.get_path(trial_params, path) == value, (name, variant.name, path)
