"""A tiny training run against a shared MLflow server (``mlflow server --serve-artifacts`` on
loopback, chosen by MLFLOW_TRACKING_URI): metrics, model and figures land on the server, nothing
in the project's mlartifacts/, and no raw patient id anywhere in the server's store."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _browser import free_port, serving
from _tiny_project import KEDRO, make_project, run_env
from conftest import make_bach_subset

MLFLOW = str(Path(sys.executable).with_name("mlflow"))
pytestmark = pytest.mark.integration


def _patients(raw: Path) -> list[str]:
    """Renames every patient folder to a distinctive hospital-like id; returns them."""
    names = []
    for i, patient in enumerate(sorted(raw.glob("*/*"))):
        name = f"Zq{patient.parent.name[:3]}Mrn{7100 + i}"
        patient.rename(patient.with_name(name))
        names.append(name)
    return names


def _store_text(db: Path, artifacts: Path) -> dict[str, str]:
    """Every text the server stored: a dump of its database and every artifact file."""
    with sqlite3.connect(db) as connection:
        found = {"db": "\n".join(connection.iterdump())}
    for file in artifacts.rglob("*"):
        if file.is_file():
            found[str(file.relative_to(artifacts))] = file.read_bytes().decode("latin-1")
    return found


def test_a_run_on_a_shared_server_logs_no_patient_id(tmp_path: Path):
    project = make_project(tmp_path / "project", with_images=False)
    raw = make_bach_subset(project / "data" / "01_raw" / "images", images_per_patient=1,
                           patients_per_class=3)
    names = _patients(raw)
    server = tmp_path / "server"
    server.mkdir()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{server}/db",
               "--serve-artifacts", "--artifacts-destination", str(server / "art"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = run_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with serving(command, f"{base}/health", server, tmp_path / "mlflow.log", env=env):
        result = subprocess.run(
            [KEDRO, "run", "--env=tiny", "--pipeline=train_resnet34"], cwd=project,
            env=run_env(MLFLOW_TRACKING_URI=base), capture_output=True, text=True,
            timeout=900, check=False)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # On the server: the run's metrics, its model and its figures; nothing local.
    stored = _store_text(server / "db", server / "art")
    assert "resnet34.test_f1_macro" in stored["db"]
    assert any(name.endswith("data/model.keras") for name in stored)
    assert any(name.endswith("confusion_matrix.csv") for name in stored)
    assert any(name.endswith(".png") for name in stored)
    assert not (project / "mlartifacts").exists() and not (project / "mlflow.db").exists()

    # The raw ids are really in the run's data (so the scan below can fail)...
    split = next((project / "data" / "05_model_input" / "split_table.csv").rglob("*.csv"))
    assert all(name in split.read_text() for name in names)
    mapping = next((project / "data" / "02_intermediate" / "group_pseudonyms.csv").rglob(
        "*.csv")).read_text()
    assert all(name in mapping for name in names)
    key = yaml.safe_load((project / "conf" / "local" / "credentials.yml").read_text())
    assert key["neuroblastoma_privacy"]["group_pseudonym_key"]
    # ...and nowhere on the server.
    leaks = {where: [n for n in names if n in text] for where, text in stored.items()}
    assert not {where: found for where, found in leaks.items() if found}
    assert "g-" in stored[next(n for n in stored if n.endswith("image_predictions.csv"))]
