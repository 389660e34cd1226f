"""Runs that end truthfully: a ``kedro run`` stopped by SIGTERM or SIGINT while it trains ends
its MLflow run KILLED with the node it reached, and promotes nothing; one killed by SIGKILL
stays RUNNING until the next run on this host finds its process gone and marks it KILLED. A
cross-validation stopped while a fold trains ends the fold's child run KILLED as well.

Each test runs the model half (``--pipeline=resnet34``) in its own copy of the session's trained
project, with many epochs so that the signal lands inside training, in its own process group
(always killed)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
from _tiny_project import KEDRO, kedro, run_env

from neuroblastoma_cnn.tracking import interrupted

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

TRAINING_NODE = "resnet34.train_model"


def _start(project: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            [KEDRO, "run", "--env=tiny", "--pipeline=resnet34",
             "--params", "resnet34.training.epochs=200"],
            cwd=project, env=run_env(), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)


def _client(project: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def _training_run(project: Path, process: subprocess.Popen, log: Path
                  ) -> mlflow.entities.Run:
    """The run this process owns, once its log shows a finished epoch."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        runs = _client(project).search_runs(
            [e.experiment_id for e in _client(project).search_experiments()],
            f"tags.`{interrupted.PID_TAG}` = '{process.pid}'")
        if runs and "epoch 2" in log.read_text().lower():
            return runs[0]
        time.sleep(1)
    pytest.fail(f"training never started:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def _group(process: subprocess.Popen):
    try:
        yield process
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def _versions(project: Path) -> set[str]:
    folder = project / "data" / "06_models" / "resnet34" / "model.keras"
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_run_ends_killed_at_its_node(trained_copy, tmp_path, sig):
    registered = len(_client(trained_copy).search_model_versions())
    before = _versions(trained_copy)
    log = tmp_path / "run.log"
    with _group(_start(trained_copy, log)) as process:
        run = _training_run(trained_copy, process, log)
        process.send_signal(sig)  # the main process only, as `kill` or a scheduler does
        assert process.wait(timeout=120) != 0
    ended = _client(trained_copy).get_run(run.info.run_id)
    assert ended.info.status == "KILLED", log.read_text()[-3000:]
    assert ended.data.tags[interrupted.KILLED_TAG] == f"stopped by {sig.name}"
    assert ended.data.tags[interrupted.STAGE_TAG] == f"node '{TRAINING_NODE}'"
    assert ended.data.tags[interrupted.HOST_TAG] and ended.data.tags[interrupted.START_TAG]
    output = log.read_text()
    assert f"Run stopped by {sig.name} during node '{TRAINING_NODE}'" in output
    assert "Traceback" not in output, output[-3000:]
    assert len(_client(trained_copy).search_model_versions()) == registered  # none registered
    for version in _versions(trained_copy) - before:  # nothing half-written promoted
        status = trained_copy / "data/06_models/resnet34/model.keras" / version
        assert '"promoted"' not in (status / "promotion.json").read_text() \
            if (status / "promotion.json").exists() else True


def test_a_killed_run_is_marked_killed_by_the_next_run(trained_copy, tmp_path):
    log = tmp_path / "run.log"
    with _group(_start(trained_copy, log)) as process:
        run = _training_run(trained_copy, process, log)
        os.killpg(process.pid, signal.SIGKILL)  # no handler, no hook: as a power cut
        process.wait(timeout=30)
    assert _client(trained_copy).get_run(run.info.run_id).info.status == "RUNNING"

    # The next start on this host: a short run (one node) finds the owner gone.
    result = kedro(trained_copy, "run", "--env=tiny", "--pipeline=resnet34",
                   "--nodes", "resnet34.write_model_card", timeout=300)
    found = _client(trained_copy).get_run(run.info.run_id)
    assert found.info.status == "KILLED", result.stdout[-3000:] + result.stderr[-3000:]
    reason = found.data.tags[interrupted.KILLED_TAG]
    assert reason.startswith(f"process {process.pid} on ") and "ended without closing" in reason


def test_a_stopped_cross_validation_ends_its_fold_runs_killed_too(trained_copy, tmp_path):
    """SIGTERM while a fold trains: the parent run and the fold's child run both end KILLED."""
    log = tmp_path / "cv.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [KEDRO, "run", "--env=tiny", "--pipeline=cross_validate",
             "--params", "resnet34.training.epochs=200"],
            cwd=trained_copy, env=run_env(), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    with _group(process):
        deadline, child = time.monotonic() + 240, None
        while child is None and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()[-3000:]
            client = _client(trained_copy)
            experiments = [e.experiment_id for e in client.search_experiments()]
            parents = client.search_runs(experiments,
                                         f"tags.`{interrupted.PID_TAG}` = '{process.pid}'")
            children = client.search_runs(experiments, "attributes.status = 'RUNNING'") \
                if parents and "epoch 2" in log.read_text().lower() else []
            child = next((r for r in children if r.data.tags.get("mlflow.parentRunId")
                          == parents[0].info.run_id), None)
            time.sleep(1)
        assert child is not None, log.read_text()[-3000:]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) != 0
    client = _client(trained_copy)
    parent = client.get_run(child.data.tags["mlflow.parentRunId"])
    ended = client.get_run(child.info.run_id)
    assert parent.info.status == "KILLED", log.read_text()[-3000:]
    assert parent.data.tags[interrupted.KILLED_TAG] == "stopped by SIGTERM"
    assert ended.info.status == "KILLED", log.read_text()[-3000:]
    assert ended.data.tags[interrupted.KILLED_TAG] == "its parent run: stopped by SIGTERM"
    assert "Traceback" not in log.read_text()  # Optuna's trace of the stopped fold is dropped
