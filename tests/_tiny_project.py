"""Throw-away copies of the Kedro project, and one tiny trained project shared by the session.

Every test that needs a project folder gets it from :func:`make_project` (pyproject + conf, code
from the installed package, empty data layers, optional raw images), finds a versioned artifact
with :func:`latest`, and runs `kedro` as a user does with :func:`kedro`.

The trained project (:func:`trained_project`) is built once per test session, whichever test
asks first: `train_resnet34` (raw images to a logged, registered model) then the `resnet50` model
half on the same data, each a `kedro run --env=tiny` subprocess with none of the quieting
variables set (the package must set them itself). Tests that only *read* a trained project (the
MLflow UI, notebooks, the logged runs, the promoted models) read it in place; tests that run more
pipelines in it get their own :func:`copy_project` of it (a second or two) instead of training
again.

The raw images are real BACH tissue (never written inside the repository: licence) laid out as a
user's data would be: `<Class>/<Patient>/<image>.png`, one patient id per patient, 14 patients a
class, so that the test split holds enough patients for a meaningful bootstrap interval.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT, make_bach_subset

PATIENTS_PER_CLASS = 14
IMAGES_PER_PATIENT = 1
# Variables the package sets for itself (quiet.py); removed so the tests prove it does.
UNSET_FOR_RUNS = ("TF_CPP_MIN_LOG_LEVEL", "KEDRO_DISABLE_TELEMETRY", "DO_NOT_TRACK",
                  "MLFLOW_DISABLE_TELEMETRY", "KEDRO_ENV", "MLFLOW_TRACKING_URI")
KEDRO = str(Path(sys.executable).with_name("kedro"))
#: Files under a project whose text may name the project's absolute path (MLflow's MLmodel,
#: tile stores' source_store, lineage records, the kedro_project's tracking URI).
_TEXT_SUFFIXES = {".json", ".yml", ".yaml", ".csv", ".md", ""}


def run_env(**extra: str) -> dict[str, str]:
    """The environment a user's shell would give: wide lines so each log record is one line."""
    env = {k: v for k, v in os.environ.items() if k not in UNSET_FOR_RUNS}
    env.update({"COLUMNS": "200", "PYTHONUNBUFFERED": "1"}, **extra)
    return env


def latest(path: Path) -> Path:
    """The newest version of a versioned artifact: ``<path>/<version>/<name>``."""
    versions = sorted(p for p in Path(path).iterdir() if p.is_dir())
    assert versions, f"no version of {path}"
    return versions[-1] / Path(path).name


def make_project(dest: Path, with_images: bool = True, images: Path | None = None,
                 tracking_in_conf: bool = False) -> Path:
    """A copy of the project (pyproject + conf, code from the installed package) at `dest`.

    Raw images: ``images`` (a folder copied as `data/01_raw/images`), else with ``with_images``
    the 14-patients-a-class BACH subset. ``tracking_in_conf``: the tiny environment's tracking
    URI is the project's absolute `mlflow.db`, for runs *in this process* (MLflow caches one
    store per URI string: the relative `sqlite:///mlflow.db` would keep writing to the first
    project's file).
    """
    dest.mkdir(parents=True)
    (dest / "src").mkdir()  # bootstrap_project checks that source_dir exists
    shutil.copy(PROJECT_ROOT / "pyproject.toml", dest / "pyproject.toml")
    shutil.copytree(PROJECT_ROOT / "conf", dest / "conf",
                    ignore=lambda folder, names: names if Path(folder).name == "local" else [])
    (dest / "conf" / "local").mkdir(exist_ok=True)
    for layer in (PROJECT_ROOT / "data").iterdir():
        if layer.is_dir():
            (dest / "data" / layer.name).mkdir(parents=True, exist_ok=True)
    raw = dest / "data" / "01_raw" / "images"
    if images is not None:
        shutil.copytree(images, raw)
    elif with_images:
        make_bach_subset(raw, images_per_patient=IMAGES_PER_PATIENT,
                         patients_per_class=PATIENTS_PER_CLASS)
        for patient in sorted(raw.glob("*/*")):  # P00 -> Ben-P00: one id per real patient
            patient.rename(patient.with_name(f"{patient.parent.name[:3]}-{patient.name}"))
    if tracking_in_conf:
        with (dest / "conf" / "tiny" / "mlflow.yml").open("a") as conf:
            conf.write(f"\nserver:\n  mlflow_tracking_uri: sqlite:///{dest / 'mlflow.db'}\n")
    return dest


def copy_project(source: Path, dest: Path) -> Path:
    """A working copy of a project that has run: the same data versions, models, MLflow runs
    and registered models, now under `dest`.

    `cp -a` keeps the hard links a promoted model shares with its MLflow artifacts; the
    absolute paths MLflow and the tile stores record (artifact locations, source stores) are
    rewritten from `source` to `dest`, in the SQLite store and in the text files that hold
    them, so the copy neither reads nor writes the original.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", str(source), str(dest)], check=True)
    old, new = str(source.resolve()), str(dest.resolve())
    for path in dest.rglob("*"):
        if path.is_file() and path.suffix in _TEXT_SUFFIXES and path.stat().st_size < 1 << 20:
            try:
                text = path.read_text()
            except UnicodeDecodeError:
                continue
            if old in text:
                path.write_text(text.replace(old, new))  # same inode: hard links stay
    if (dest / "mlflow.db").exists():
        _rewrite_store(dest / "mlflow.db", old, new)
    return dest


def _rewrite_store(db: Path, old: str, new: str) -> None:
    with sqlite3.connect(db) as connection:
        tables = [row[0] for row in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for column in connection.execute(f"PRAGMA table_info('{table}')").fetchall():
                name, kind = column[1], (column[2] or "").upper()
                if "CHAR" in kind or "TEXT" in kind or "CLOB" in kind:
                    connection.execute(
                        f'UPDATE "{table}" SET "{name}" = REPLACE("{name}", ?, ?) '
                        f'WHERE "{name}" LIKE ?', (old, new, f"%{old}%"))


def kedro(project: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Runs `kedro <args>` in the project folder and returns its captured output."""
    return subprocess.run([KEDRO, *args], cwd=project, env=run_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)


@dataclass
class TrainedProject:
    path: Path
    runs: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)


_trained: TrainedProject | None = None


def trained_project(factory: pytest.TempPathFactory) -> TrainedProject:
    """`train_resnet34` (raw images to a logged model), then the `resnet50` model half on the
    same data: once per test session, whichever test asks first (the `trained` fixture).

    Under pytest-xdist the workers of one session share it: the first to ask builds it under a
    file lock in the session's common temporary folder, the others wait for that lock and read
    it. A build that failed fails every test that asks, with that build's output.
    """
    global _trained  # noqa: PLW0603
    if _trained is None:
        base = factory.getbasetemp()
        _trained = open_trained(base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base)
    return _trained


def open_trained(shared: Path) -> TrainedProject:
    """The trained project in `shared/trained_project`, built there by whichever process gets
    the lock first; `pytest.fail` with the build's own output if it failed (now or before)."""
    root = shared / "trained_project"
    with _locked(shared / "trained_project.lock"):
        if not (root / "built").exists() and not (root / "failed").exists():
            _build_trained(root)
    if (root / "failed").exists():
        pytest.fail((root / "failed").read_text())
    runs = {log.stem: subprocess.CompletedProcess(
                [KEDRO, "run", "--env=tiny", f"--pipeline={log.stem}"], 0,
                log.read_text(), log.with_suffix(".err").read_text())
            for log in sorted((root / "runs").glob("*.out"))}
    return TrainedProject(root / "project", runs)


def _build_trained(root: Path) -> None:
    """Builds the trained project in `root/project`; writes `root/built`, or `root/failed` with
    the failing run's output."""
    project = make_project(root / "project")
    (root / "runs").mkdir()
    for pipeline in ("train_resnet34", "resnet50"):
        result = kedro(project, "run", "--env=tiny", f"--pipeline={pipeline}")
        (root / "runs" / f"{pipeline}.out").write_text(result.stdout)
        (root / "runs" / f"{pipeline}.err").write_text(result.stderr)
        if result.returncode != 0:
            (root / "failed").write_text(
                f"The session's trained project could not be built: kedro run --env=tiny "
                f"--pipeline={pipeline} failed:\n{result.stdout[-4000:]}\n"
                f"{result.stderr[-4000:]}")
            return
    (root / "built").write_text("")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (POSIX), held while the block runs."""
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
