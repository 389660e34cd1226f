"""One writer in a multi-worker run: two ``kedro run --pipeline=resnet34`` workers of one
``TF_CONFIG`` cluster train the same model, and only the chief (worker 0) writes under
``data/``, logs an MLflow run and registers a version; both end with the same weights. A
worker that would write tile stores (the data stages) is refused in one line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import mlflow
import pytest
from _browser import free_port
from _tiny_project import KEDRO, run_env

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


def _files(project: Path) -> set[str]:
    data = project / "data"
    return {p.relative_to(data).as_posix() for p in data.rglob("*")
            if p.is_file() and ".backup" not in p.parts}


def _workers(project: Path, pipeline: str, tmp_path: Path) -> list[tuple[int, str]]:
    ports = {free_port()}
    while len(ports) < 2:
        ports.add(free_port())
    cluster = {"worker": [f"127.0.0.1:{port}" for port in sorted(ports)]}
    children, logs = [], []
    try:
        for index in range(2):
            config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            logs.append(tmp_path / f"worker{index}.log")
            with logs[-1].open("w") as out:
                children.append(subprocess.Popen(
                    [KEDRO, "run", "--env=tiny", f"--pipeline={pipeline}"], cwd=project,
                    env=run_env(TF_CONFIG=config), stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True))
        return [(child.wait(timeout=500), log.read_text())
                for child, log in zip(children, logs, strict=True)]
    finally:
        for child in children:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait(timeout=30)


def test_only_the_chief_writes_logs_and_registers(trained_copy, tmp_path):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{trained_copy / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs_before = {r.info.run_id for r in client.search_runs(experiments)}
    versions_before = len(client.search_model_versions())
    files_before = _files(trained_copy)

    (chief_code, chief_log), (other_code, other_log) = _workers(trained_copy, "resnet34",
                                                                tmp_path)
    assert chief_code == 0, chief_log[-3000:]
    assert other_code == 0, other_log[-3000:]
    assert "multi_worker, 2 replica(s)" in chief_log
    assert "Worker 1 of the cluster:" in other_log and "no MLflow run" in other_log

    new_runs = [r for r in client.search_runs(experiments) if r.info.run_id not in runs_before]
    assert len(new_runs) == 1 and new_runs[0].info.status == "FINISHED"
    assert len(client.search_model_versions()) == versions_before + 1
    digests = [re.findall(r"weights sha256 ([0-9a-f]{64})", log) for log in (chief_log,
                                                                              other_log)]
    assert digests[0] and digests[0] == digests[1]  # the same weights on both workers
    written = _files(trained_copy) - files_before
    assert any(f.startswith("06_models/resnet34/model.keras/") for f in written)
    versions = {f.split("/")[3] for f in written if f.startswith("06_models/resnet34/model.keras/")}
    assert len(versions) == 1  # one model version: the chief's


def test_a_worker_refuses_to_write_tile_stores(trained_copy, tmp_path):
    config = json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                         "task": {"type": "worker", "index": 1}})
    result = subprocess.run([KEDRO, "run", "--env=tiny", "--pipeline=data_processing"],
                            cwd=trained_copy, env=run_env(TF_CONFIG=config),
                            capture_output=True, text=True, timeout=300, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Worker 1 of the TF_CONFIG cluster would write the tile stores" in output, output
    assert "Traceback" not in output
