"""The trial loop on a cheap fake objective: every grid trial runs once, a killed worker's trial
is retried and counted once, two worker processes share one storage, search prunes."""

from __future__ import annotations

import collections
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from _study_fakes import (
    MODEL_PARAMS,
    LoggingObjective,
    SupersededObjective,
    grid_plan,
    read_log,
    search_objective,
    study_params,
)
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from neuroblastoma_cnn.core.errors import DataError
from neuroblastoma_cnn.pipelines.study import config, results
from neuroblastoma_cnn.trials import child_runs as tracking
from neuroblastoma_cnn.trials import engine
from neuroblastoma_cnn.trials.engine import ATTR_METRICS

pytestmark = pytest.mark.timeout(180)


def _start(plan: config.StudyPlan, target: tracking.TrackingTarget | None = None
           ) -> tuple[optuna.Study, str]:
    storage = engine.open_storage(plan.storage, plan.heartbeat_seconds)
    name = engine.optuna_study_name(plan, "data-v1")
    return engine.create_or_load(plan, storage, name, target), name


def _runs_per_point(log: Path, event: str) -> collections.Counter:
    return collections.Counter((e["variant"], e["repeat"]) for e in read_log(log)
                               if e["event"] == event)


def _summary(plan: config.StudyPlan, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    study = engine.load_existing(plan, name)
    trials = pd.DataFrame(engine.trial_rows(study, plan))
    return trials, results.summarize(trials, plan)


def test_grid_runs_every_trial_once_and_resumes_as_done(tmp_path):
    plan = grid_plan(f"sqlite:///{tmp_path / 'study.db'}")
    _, name = _start(plan)
    log = tmp_path / "log.jsonl"
    engine.run_workers(engine.WorkerConfig(plan, name, LoggingObjective(log)), 1)
    points = engine.grid_points(plan)
    assert _runs_per_point(log, "end") == collections.Counter(points)

    engine.run_workers(engine.WorkerConfig(plan, name, LoggingObjective(log)), 1)
    assert _runs_per_point(log, "start") == collections.Counter(points)  # nothing ran again

    trials, summary = _summary(plan, name)
    assert trials["counted"].sum() == len(points) == 9
    assert list(summary["variant"]) == plan.variant_names
    row = summary.set_index("variant").loc["dropout=0.5"]
    assert row["mean"] == pytest.approx(0.5 + 0.05 + 0.01)  # repeats 0, 1, 2 -> +0.01 average
    assert row["mean_diff"] == pytest.approx(0.05) and row["rank_biserial"] == 1.0
    assert row["p_value"] == pytest.approx(0.25)  # 3 pairs, all positive: exact 2/8
    assert {"f1_A_mean", "f1_B_mean", "accuracy_mean"} <= set(summary.columns)


def test_changed_definition_is_a_new_study(tmp_path):
    plan = grid_plan(f"sqlite:///{tmp_path / 'study.db'}")
    other = grid_plan(plan.storage, values=(0.0, 0.75))
    assert engine.optuna_study_name(plan, "d") != engine.optuna_study_name(other, "d")
    assert engine.optuna_study_name(plan, "d") != engine.optuna_study_name(plan, "new data")
    assert engine.optuna_study_name(plan, "d") == engine.optuna_study_name(
        grid_plan(plan.storage), "d")


def test_incomplete_study_cannot_be_summarised(tmp_path):
    plan = grid_plan(f"sqlite:///{tmp_path / 'study.db'}")
    study, _ = _start(plan)
    with pytest.raises(DataError, match="not complete: 9 trial"):
        engine.check_complete(study, plan)


def _run_hanging(plan, name, log, target):
    """Child process: runs the study and hangs in its third trial, to be killed there."""
    engine.run_worker(engine.WorkerConfig(plan, name, LoggingObjective(log, hang_on=2), target))


def _mlflow_target(tmp_path: Path) -> tracking.TrackingTarget:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("study-test",
                                          artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(experiment, run_name="parent")
    return tracking.TrackingTarget(uri, experiment, parent.info.run_id)


@pytest.mark.integration
def test_resume_after_kill_runs_only_unfinished_trials(tmp_path):
    plan = grid_plan(f"sqlite:///{tmp_path / 'study.db'}", values=(0.0, 0.5), repeats=2)
    target = _mlflow_target(tmp_path)
    _, name = _start(plan, target)
    log = tmp_path / "log.jsonl"
    child = mp.get_context("spawn").Process(target=_run_hanging, args=(plan, name, log, target))
    child.start()
    deadline = time.monotonic() + 120
    while not any(e["trial"] == 2 and e["event"] == "start" for e in read_log(log)):
        assert child.is_alive() and time.monotonic() < deadline, "the worker never got to trial 2"
        time.sleep(0.2)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    killed = next(e for e in read_log(log) if e["trial"] == 2)
    finished_before = _runs_per_point(log, "end")
    assert sum(finished_before.values()) == 2  # trials 0 and 1 finished before the kill

    engine.run_workers(engine.WorkerConfig(plan, name, LoggingObjective(log), target), 1)

    points = engine.grid_points(plan)
    ends = _runs_per_point(log, "end")
    assert ends == collections.Counter(points)  # every point finished exactly once
    starts = _runs_per_point(log, "start")
    for point in points:  # finished ones never ran again; only the killed one started twice
        expected = 2 if point == (killed["variant"], killed["repeat"]) else 1
        assert starts[point] == expected, point

    study = engine.load_existing(plan, name)
    states = collections.Counter(t.state for t in study.get_trials())
    assert states[TrialState.COMPLETE] == len(points) and states[TrialState.FAIL] == 1
    retry = [t for t in study.get_trials() if t.system_attrs.get("failed_trial") == 2]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    trials, summary = _summary(plan, name)
    assert trials["counted"].sum() == len(points)
    assert summary["n"].tolist() == [2, 2]

    # MLflow: one FINISHED child run per point under the study's parent; the killed attempt's
    # run is closed as KILLED and marked as not counted
    runs = tracking.child_runs(target.uri, target.experiment_id, target.parent_run_id)
    by_status = collections.Counter(r.info.status for r in runs)
    assert by_status == {"FINISHED": len(points), "KILLED": 1}
    killed_run = next(r for r in runs if r.info.status == "KILLED")
    assert killed_run.data.tags["study.counted"] == "false"
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert {(r.data.tags["study.variant"], int(r.data.tags["study.repeat"]))
            for r in finished} == set(points)
    assert all("test_f1_macro" in r.data.metrics and "model.dropout" in r.data.params
               for r in finished)
    # a worker killed between creating its run and recording it in the trial leaves a run
    # only its tags tie to the trial: the final sweep finds and closes it
    client = MlflowClient(tracking_uri=target.uri)
    orphan = client.create_run(target.experiment_id, tags={
        tracking.PARENT_TAG: target.parent_run_id, "study.optuna_study": name,
        "study.trial": "2"})
    assert engine.close_orphan_runs(study, target) == 1
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"


@pytest.mark.integration
def test_two_workers_share_one_storage(tmp_path):
    plan = grid_plan(f"sqlite:///{tmp_path / 'study.db'}", values=(0.0, 0.25, 0.5), repeats=2)
    _, name = _start(plan)
    log = tmp_path / "log.jsonl"
    engine.run_workers(engine.WorkerConfig(plan, name, LoggingObjective(log, sleep=0.5)), 2)
    points = engine.grid_points(plan)
    assert _runs_per_point(log, "start") == collections.Counter(points)
    assert _runs_per_point(log, "end") == collections.Counter(points)
    assert len({e["pid"] for e in read_log(log)}) == 2  # both workers ran trials
    assert os.getpid() not in {e["pid"] for e in read_log(log)}
    trials, _ = _summary(plan, name)
    assert trials["counted"].sum() == len(points)


def test_a_failing_trial_stops_the_run_and_is_retried_on_resume(tmp_path):
    plan = grid_plan(f"sqlite:///{tmp_path / 'study.db'}", values=(0.0, 0.5), repeats=1)
    _, name = _start(plan)

    def broken(spec, context):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        engine.run_workers(engine.WorkerConfig(plan, name, broken), 1)
    log = tmp_path / "log.jsonl"
    engine.run_workers(engine.WorkerConfig(plan, name, LoggingObjective(log)), 1)
    assert _runs_per_point(log, "end") == collections.Counter(engine.grid_points(plan))


def test_a_trial_taken_over_as_stale_is_not_counted(tmp_path):
    plan = grid_plan(f"sqlite:///{tmp_path / 'study.db'}", values=(0.0, 0.5), repeats=2)
    _, name = _start(plan)
    log = tmp_path / "log.jsonl"
    engine.run_workers(engine.WorkerConfig(
        plan, name, SupersededObjective(log, plan.storage, name, on_trial=1)), 1)
    study = engine.load_existing(plan, name)
    assert study.get_trials()[1].state == TrialState.FAIL
    assert ATTR_METRICS not in study.get_trials()[1].user_attrs  # its result was dropped
    trials, summary = _summary(plan, name)
    assert trials["counted"].sum() == 4 and summary["n"].tolist() == [2, 2]
    again = [t for t in study.get_trials() if t.number > 1 and t.state == TrialState.COMPLETE
             and engine.point_of(t) == engine.point_of(study.get_trials()[1])]
    assert len(again) == 1  # run again once, counted once


def test_search_samples_prunes_and_exports_best_parameters(tmp_path):
    params = study_params(f"sqlite:///{tmp_path / 'study.db'}", search={
        "mode": "search", "n_trials": 12,
        "pruner": {"n_startup_trials": 3, "n_warmup_steps": 0},
        "space": {"model.dropout": {"type": "float", "low": 0.0, "high": 0.75},
                  "training.learning_rate": {"type": "float", "low": 1e-4, "high": 0.1,
                                             "log": True},
                  "training.optimizer": {"type": "categorical", "choices": ["sgd", "adam"]}}})
    plan = config.resolve_study(params, MODEL_PARAMS)
    _, name = _start(plan)
    engine.run_workers(engine.WorkerConfig(plan, name, search_objective), 1)
    study = engine.load_existing(plan, name)
    states = collections.Counter(t.state for t in study.get_trials())
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == 12
    assert states[TrialState.PRUNED] >= 1
    assert all(len(t.intermediate_values) >= 1 for t in study.get_trials())

    trials, summary = _summary(plan, name)
    best, why = results.best_overrides(trials, summary, plan)
    assert best["model.dropout"] == pytest.approx(study.best_trial.params["model.dropout"])
    text = results.best_parameters_yaml(plan, best, why)
    pasted = yaml.safe_load(text)
    assert set(pasted) == {"m"}
    assert pasted["m"]["training"]["optimizer"] == study.best_trial.params["training.optimizer"]
    assert text.startswith("# Best configuration of study 'search'")
    markdown = results.summary_text(trials, summary, plan, name)
    assert "median pruning" in markdown


def test_grid_best_parameters_choose_on_validation(tmp_path):
    plan = grid_plan(f"sqlite:///{tmp_path / 'study.db'}", values=(0.0, 0.5), repeats=2)
    _, name = _start(plan)
    engine.run_workers(engine.WorkerConfig(plan, name, LoggingObjective(tmp_path / "l")), 1)
    trials, summary = _summary(plan, name)
    best, why = results.best_overrides(trials, summary, plan)
    assert best == {"model.dropout": 0.5} and "validation" in why
    assert yaml.safe_load(results.best_parameters_yaml(plan, best, why)) == {
        "m": {"model": {"dropout": 0.5}}}
    text = results.summary_text(trials, summary, plan, name)
    assert "| **dropout=0** (baseline) | 2 |" in text and "F1 A" in text
