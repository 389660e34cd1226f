"""A study end to end in the tiny environment, as a user runs it: `kedro run --pipeline=study`.

One project runs `data_processing` once; the `dropout` study (2 values x 2 repeats, 1 epoch) is
started, killed with SIGKILL while a trial runs, and resumed with two worker processes. Then
the trials, the MLflow child runs, the summary with its paired test and the best parameters are
checked. `test_a_search_study_runs_end_to_end` (slow) runs the shipped `search` study at its
tiny size; every shipped study is validated into its trials in test_study_config.py.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
import yaml
from _tiny_project import KEDRO, kedro, latest, make_project, run_env
from optuna.trial import TrialState

from neuroblastoma_cnn.trials.engine import open_storage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

ONE_EPOCH = "resnet34.training.epochs=1"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_project(tmp_path_factory.mktemp("study") / "project")
    result = kedro(path, "run", "--env=tiny", "--pipeline=data_processing")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return path


def _study(project: Path, prefix: str) -> optuna.Study | None:
    if not (project / "data" / "optuna.db").exists():
        return None
    # the product's opener: it waits out a run that is creating the tables at this moment
    storage = open_storage(f"sqlite:///{project / 'data' / 'optuna.db'}", heartbeat_seconds=60)
    names = [n for n in optuna.study.get_all_study_names(storage) if n.startswith(prefix)]
    return optuna.load_study(study_name=names[0], storage=storage) if names else None


def _states(study: optuna.Study | None) -> collections.Counter:
    return collections.Counter(t.state for t in study.get_trials()) if study else \
        collections.Counter()


def _start_and_kill(project: Path) -> tuple[set[int], int]:
    """Starts the dropout study and kill -9s the whole `kedro run` while a trial runs (after
    one finished); returns the finished trial numbers and the killed one."""
    log = project / "killed_run.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [KEDRO, "run", "--env=tiny", "--pipeline=study",
             f"--params=study.name=dropout,{ONE_EPOCH}"],
            cwd=project, env=run_env(), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    deadline = time.monotonic() + 600
    while True:  # kill once a trial finished and the next one has its MLflow run (training)
        study = _study(project, "dropout-")
        states = _states(study)
        if states[TrialState.COMPLETE] >= 1 and any(
                t.state == TrialState.RUNNING and t.user_attrs.get("mlflow_run_id")
                for t in study.get_trials()):
            break
        assert process.poll() is None, f"the study ended before it could be killed:\n" \
                                       f"{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no running trial to kill: {states}"
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = _study(project, "dropout-")
    killed = [t.number for t in before.get_trials() if t.state == TrialState.RUNNING]
    assert len(killed) == 1
    return {t.number for t in before.get_trials(states=(TrialState.COMPLETE,))}, killed[0]


def _check_trials(project: Path, done_before: set[int], killed: int) -> int:
    study = _study(project, "dropout-")
    trials = study.get_trials()
    states = _states(study)
    assert states[TrialState.COMPLETE] == 4 and states[TrialState.FAIL] == 1
    points = collections.Counter((t.params["variant"], t.params["repeat"]) for t in trials
                                 if t.state == TrialState.COMPLETE)
    assert len(points) == 4 and set(points.values()) == {1}  # each (variant, repeat) once
    assert {t.number for t in trials if t.state == TrialState.FAIL} == {killed}
    resumed = [t for t in trials if t.state == TrialState.COMPLETE and t.number not in
               done_before]
    assert len({t.user_attrs["worker"] for t in resumed}) == 2  # both workers trained
    assert any(t.system_attrs.get("failed_trial") == killed for t in resumed)
    return len(trials)


def _check_mlflow(project: Path) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["neuroblastoma_cnn_tiny"],
                              filter_string="attributes.run_name = 'study'",
                              output_format="list", order_by=["attributes.start_time ASC"])
    assert len(runs) == 2
    first, second = runs
    assert second.info.status == "FINISHED"
    assert second.data.tags["study.parent_run_id"] == first.info.run_id
    children = mlflow.search_runs(
        experiment_names=["neuroblastoma_cnn_tiny"], output_format="list",
        filter_string=f"tags.`mlflow.parentRunId` = '{first.info.run_id}'")
    assert collections.Counter(c.info.status for c in children) == {"FINISHED": 4, "KILLED": 1}
    child = next(c for c in children if c.info.status == "FINISHED")
    assert child.data.params["model.dropout"] in {"0.0", "0.5"}
    assert child.data.params["training.learning_rate"] == "0.001"  # the study's fixed value
    assert "test_f1_macro" in child.data.metrics and "objective" in child.data.metrics
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(child.info.run_id, "val_macro_f1")] == [1]
    names = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"confusion_matrix.csv", "confusion_matrix.png", "classification_report.csv",
            "training_history.csv"} <= names
    summary_artifacts = {a.path for a in client.list_artifacts(second.info.run_id, "study")}
    assert {"study/summary.csv", "study/summary.md", "study/macro_f1.png",
            "study/trials.csv", "study/best_parameters.yml"} <= summary_artifacts


def _check_summary(project: Path) -> None:
    summary = pd.read_csv(latest(project / "data/08_reporting/study/summary.csv"))
    assert list(summary["variant"]) == ["dropout=0", "dropout=0.5"]
    assert summary["n"].tolist() == [2, 2]
    assert summary["baseline"].tolist() == [True, False]
    other = summary.iloc[1]
    assert other["n_pairs"] == 2 and 0 < other["p_value"] <= 1
    assert -1 <= other["rank_biserial"] <= 1 or pd.isna(other["rank_biserial"])
    for column in ("mean", "sd", "ci_low", "ci_high", "accuracy_mean", "mean_diff"):
        assert column in summary
    classes = sorted(p.name for p in (project / "data/01_raw/images").iterdir())
    assert {f"f1_{c}_mean" for c in classes} <= set(summary.columns)
    report = latest(project / "data/08_reporting/study/summary.md").read_text()
    assert "| Variant | n | Macro-F1 mean ± sd | 95% CI |" in report
    best = yaml.safe_load(latest(project / "data/08_reporting/study/best_parameters.yml")
                          .read_text())
    assert set(best) == {"resnet34"} and "dropout" in best["resnet34"]["model"]
    assert best["resnet34"]["training"]["learning_rate"] == 0.001


def test_study_runs_resumes_after_kill_with_two_workers(project: Path):
    done_before, killed = _start_and_kill(project)
    # resume the same study with two worker processes: only unfinished trials run
    result = kedro(project, "run", "--env=tiny", "--pipeline=study",
                   f"--params=study.name=dropout,study.workers=2,{ONE_EPOCH}", timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    n_trials = _check_trials(project, done_before, killed)
    _check_mlflow(project)
    _check_summary(project)
    # a finished study run again trains nothing and summarises the same trials
    again = kedro(project, "run", "--env=tiny", "--pipeline=study",
                  f"--params=study.name=dropout,{ONE_EPOCH}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(_study(project, "dropout-").get_trials()) == n_trials


def test_bad_study_is_one_line_before_training(project: Path):
    result = kedro(project, "run", "--env=tiny", "--pipeline=study",
                   "--params=study.name=dropuot")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Unknown study 'dropuot'" in output and "Traceback" not in output
    assert "Trial 0" not in output
    # the project command runs the same pipeline: the same one-line error, exit code 2
    command = subprocess.run([str(Path(KEDRO).with_name("neuroblastoma-cnn")), "study",
                              "dropuot", "--env", "tiny"], cwd=project, env=run_env(),
                             capture_output=True, text=True, timeout=300, check=False)
    assert command.returncode == 2
    assert "neuroblastoma-cnn: error: Unknown study 'dropuot'" in command.stderr


@pytest.mark.slow
def test_a_search_study_runs_end_to_end(project: Path):
    """The representative shipped study end to end: `search` (TPE, the median pruner on
    per-epoch validation macro-F1, best parameters). Grid studies run end to end in the
    kill/resume test above; every shipped study is resolved and validated into its trials in
    test_study_config.py::test_every_shipped_study_is_validated_into_its_trials."""
    result = kedro(project, "run", "--env=tiny", "--pipeline=study",
                   f"--params=study.name=search,{ONE_EPOCH}", timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    states = _states(_study(project, "search-"))
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == 4, states
    best = yaml.safe_load(latest(project / "data/08_reporting/study/best_parameters.yml")
                          .read_text())
    assert set(best) == {"resnet34"}, best
    assert {"optimizer", "learning_rate"} <= set(best["resnet34"]["training"]), best
    assert {"dropout", "l2"} <= set(best["resnet34"]["model"]), best
