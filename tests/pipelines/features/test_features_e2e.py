"""End to end in the tiny environment: raw BACH tissue -> CNN -> features -> scikit-learn heads,
then prediction with extractor + head on the test images.

`train_resnet34_features` (raw images to CNN to heads in one run) runs once in a project of its
own, which the prediction test then uses. The features of the latest trained ResNet34 and of
an untrained ResNet50 run in a copy of the session's trained project. (Both ResNets' features
pipelines are namespaced copies of one pipeline; a trained ResNet50 extractor is checked in
test_features_extractor.py.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from _tiny_project import TrainedProject, copy_project, latest, make_project

from neuroblastoma_cnn.core.errors import ModelError
from neuroblastoma_cnn.datasets import load_keras_model
from neuroblastoma_cnn.datasets.sklearn_heads import load_heads
from neuroblastoma_cnn.models.feature_heads import extractor_identity
from neuroblastoma_cnn.pipelines.features.nodes import ATTRS, CNN_PREDICTOR, feature_columns

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HEADS = ["svm", "tree", "logreg", "hgb"]


def _runs(project: Path, run_name: str) -> list[mlflow.entities.Run]:
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["neuroblastoma_cnn_tiny"],
                              filter_string=f"attributes.run_name = '{run_name}'",
                              output_format="list")


def _check_features_run(project: Path, model_name: str, run_name: str, trained: bool) -> None:
    table = pd.read_parquet(latest(project / f"data/04_feature/{model_name}/features.parquet"))
    split = pd.read_csv(latest(project / "data/05_model_input/split_table.csv"))
    assert sorted(table["tile_id"]) == sorted(split["tile_id"])  # train, validation and test
    identity = table.attrs[ATTRS]["extractor"]
    assert identity["architecture"] == model_name
    assert len(feature_columns(table)) == identity["feature_dim"]
    heads = load_heads(latest(project / f"data/06_models/{model_name}/heads.pkl"))
    assert sorted(heads) == sorted(HEADS)
    for bundle in heads.values():
        assert bundle["extractor"] == identity

    comparison = pd.read_csv(latest(project / f"data/08_reporting/{model_name}/"
                                     "heads_comparison.csv"))
    expected = ([CNN_PREDICTOR] if trained else []) + HEADS
    assert list(comparison["predictor"]) == expected
    assert (comparison["f1_macro_low"] <= comparison["f1_macro"] + 1e-12).all()
    test_images = set(split.loc[split["split"] == "test", "image_path"])
    images = pd.read_csv(latest(project / f"data/07_model_output/{model_name}/"
                                 "heads_image_predictions.csv"))
    for _, rows in images.groupby("predictor"):
        assert set(rows["image_path"]) == test_images

    runs = _runs(project, run_name)
    assert runs, f"no MLflow run named {run_name}"
    parent = max(runs, key=lambda run: run.info.start_time)  # this run: the newest of its name
    assert parent.info.status == "FINISHED", f"{run_name}: {parent.info.status}"
    assert f"{model_name}.svm.test_f1_macro" in parent.data.metrics
    children = mlflow.search_runs(
        experiment_ids=[parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", output_format="list")
    assert sorted(c.data.tags["head"] for c in children) == sorted(HEADS)
    for child in children:
        assert child.data.tags["extractor_weights_sha256"] == identity["weights_sha256"]
        assert child.data.tags["extractor_model"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id,
                                                                      f"{model_name}/heads")}
    assert f"{model_name}/heads/heads_comparison.csv" in artifacts


@pytest.fixture(scope="module")
def in_run(tmp_path_factory: pytest.TempPathFactory, bach_subset: Path,
           run_kedro) -> Path:
    """A project where `train_resnet34_features` ran (the working directory of the module)."""
    project = make_project(tmp_path_factory.mktemp("features") / "project", images=bach_subset,
                           tracking_in_conf=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        run_kedro("train_resnet34_features")
        yield project


def test_raw_images_to_cnn_to_heads_in_one_run(in_run: Path):
    kedro_project, model_name = in_run, "resnet34"
    _check_features_run(kedro_project, model_name, f"train_{model_name}_features", trained=True)

    # The heads were fitted on the model this run trained, and its softmax is the evaluation's.
    model = load_keras_model(latest(kedro_project / f"data/06_models/{model_name}/model.keras"))
    heads = load_heads(latest(kedro_project / f"data/06_models/{model_name}/heads.pkl"))
    identity = extractor_identity(model, heads["svm"]["feature_dim"])
    assert heads["svm"]["extractor"]["weights_sha256"] == identity["weights_sha256"]
    cnn = pd.read_csv(latest(kedro_project / f"data/07_model_output/{model_name}/"
                             "image_predictions.csv")).set_index("image_path")
    ours = pd.read_csv(latest(kedro_project / f"data/07_model_output/{model_name}/"
                              "heads_image_predictions.csv"))
    ours = ours[ours["predictor"] == CNN_PREDICTOR].set_index("image_path").loc[cnn.index]
    prob = [c for c in cnn.columns if c.startswith("prob_")]
    np.testing.assert_allclose(ours[prob].to_numpy(), cnn[prob].to_numpy(), atol=1e-5)
    metrics = json.loads(latest(kedro_project / f"data/08_reporting/{model_name}/"
                                "heads_test_metrics.json").read_text())
    assert set(metrics) == {CNN_PREDICTOR, *HEADS}


def test_features_on_the_latest_model_and_on_an_untrained_resnet50(
        trained: TrainedProject, tmp_path: Path, run_kedro, monkeypatch: pytest.MonkeyPatch):
    kedro_project = copy_project(trained.path, tmp_path / "project")
    monkeypatch.chdir(kedro_project)
    run_kedro("resnet34_features")  # the latest model (the default extractor)
    _check_features_run(kedro_project, "resnet34", "resnet34_features", trained=True)

    run_kedro("resnet50_features", runtime_params={
        "features": {"extractors": {"resnet50": {"source": "untrained", "weights": None}}}})
    _check_features_run(kedro_project, "resnet50", "resnet50_features", trained=False)

    shutil.rmtree(kedro_project / "data/06_models/resnet34/model.keras")
    with pytest.raises(Exception, match="kedro run --pipeline=train_resnet34"):
        run_kedro("resnet34_features")  # tiles and split, but no model trained yet


def test_predict_with_a_head_equals_the_evaluation(in_run: Path, run_kedro):
    kedro_project = in_run
    split = pd.read_csv(latest(kedro_project / "data/05_model_input/split_table.csv"))
    test_images = sorted(split.loc[split["split"] == "test", "image_path"].unique())
    raw, folder = kedro_project / "data/01_raw/images", kedro_project / "data/01_raw/predict"
    for name in test_images:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(raw / name, folder / name)

    run_kedro("predict", runtime_params={"predict": {"head": "svm"}})
    predictions = pd.read_csv(latest(kedro_project / "data/07_model_output/predictions.csv"))
    predictions = predictions.set_index("file").loc[test_images]
    assert predictions["model"].str.contains("head svm").all()
    evaluated = pd.read_csv(latest(kedro_project / "data/07_model_output/resnet34/"
                                    "heads_image_predictions.csv"))
    evaluated = evaluated[evaluated["predictor"] == "svm"].set_index("image_path").loc[test_images]
    prob = [c for c in evaluated.columns if c.startswith("prob_")]
    np.testing.assert_allclose(predictions[prob].to_numpy(), evaluated[prob].to_numpy(),
                               atol=1e-4)
    assert list(predictions["predicted"]) == list(evaluated["predicted"])

    # A retrained model: its heads do not exist yet, so predict refuses the old ones.
    run_kedro("train_resnet34", runtime_params={"resnet34": {"training": {"seed": 7}}})
    with pytest.raises(ModelError, match="none was fitted on the features of model"):
        run_kedro("predict", runtime_params={"predict": {"head": "svm"}})
