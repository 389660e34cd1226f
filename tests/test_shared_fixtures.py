"""The session's shared trained project fails loudly and once: a build that fails fails every
test that asks for it with the build's own output, and is not retried by the next one."""

from __future__ import annotations

import subprocess
from pathlib import Path

import _tiny_project
import pytest


def test_a_failed_build_fails_every_asking_test_with_its_own_output(tmp_path: Path,
                                                                   monkeypatch):
    calls = []

    def failing_kedro(project: Path, *args: str, timeout: float = 600):
        calls.append(args)
        return subprocess.CompletedProcess(["kedro", *args], 1, "ingestion: node boom",
                                           "DataError: no images")

    monkeypatch.setattr(_tiny_project, "kedro", failing_kedro)
    monkeypatch.setattr(_tiny_project, "make_bach_subset", lambda dest, **_: dest)
    for _ in range(2):  # a second test asking gets the same failure, without a second build
        with pytest.raises(pytest.fail.Exception) as failure:
            _tiny_project.open_trained(tmp_path)
        message = str(failure.value)
        assert "could not be built: kedro run --env=tiny --pipeline=train_resnet34" in message
        assert "ingestion: node boom" in message and "DataError: no images" in message
    assert calls == [("run", "--env=tiny", "--pipeline=train_resnet34")]


def test_a_copy_of_a_project_names_its_own_folder(tmp_path: Path):
    """`copy_project` rewrites the absolute paths a run records (here: a text file and an
    MLflow-like SQLite table) and keeps hard links."""
    import sqlite3  # noqa: PLC0415

    source = tmp_path / "a" / "project"
    (source / "data").mkdir(parents=True)
    (source / "data" / "store.json").write_text(f'{{"source_store": "{source}/data/x"}}')
    (source / "data" / "model.keras").write_bytes(b"weights")
    (source / "data" / "model_link.keras").hardlink_to(source / "data" / "model.keras")
    with sqlite3.connect(source / "mlflow.db") as db:
        db.execute("CREATE TABLE runs (artifact_uri VARCHAR(200), n INTEGER)")
        db.execute("INSERT INTO runs VALUES (?, 1)", (f"file://{source}/mlartifacts/1",))
    copy = _tiny_project.copy_project(source, tmp_path / "b" / "project")
    assert (copy / "data" / "store.json").read_text() == f'{{"source_store": "{copy}/data/x"}}'
    assert (copy / "data" / "model.keras").stat().st_ino == \
        (copy / "data" / "model_link.keras").stat().st_ino
    with sqlite3.connect(copy / "mlflow.db") as db:
        assert db.execute("SELECT artifact_uri FROM runs").fetchall() == [
            (f"file://{copy}/mlartifacts/1",)]
    assert str(source) in (source / "data" / "store.json").read_text()  # the original kept
