"""One tiny trained project, shared by the tests that look at what a user sees after training.

The MLflow UI, notebook and run-output tests all need a project where both models were trained;
training once per test session keeps them fast. Pipelines run as a user runs them: `kedro run`
in a subprocess, from the project folder, with none of the quieting variables set (the package
must set them itself).

The raw images are real BACH tissue (never written inside the repository: licence) laid out as a
user's data would be: `<Class>/<Patient>/<image>.png`, one patient id per patient, 14 patients a
class, so that the test split holds enough patients for a meaningful bootstrap interval.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


def run_env(**extra: str) -> dict[str, str]:
    """The environment a user's shell would give: wide lines so each log record is one line."""
    env = {k: v for k, v in os.environ.items() if k not in UNSET_FOR_RUNS}
    env.update({"COLUMNS": "200", "PYTHONUNBUFFERED": "1"}, **extra)
    return env


def make_project(dest: Path, with_images: bool = True) -> Path:
    """A copy of the project (pyproject + conf, code from the installed package) at `dest`."""
    dest.mkdir(parents=True)
    (dest / "src").mkdir()  # bootstrap_project checks that source_dir exists
    shutil.copy(PROJECT_ROOT / "pyproject.toml", dest / "pyproject.toml")
    shutil.copytree(PROJECT_ROOT / "conf", dest / "conf",
                    ignore=lambda folder, names: names if Path(folder).name == "local" else [])
    (dest / "conf" / "local").mkdir(exist_ok=True)
    for layer in (PROJECT_ROOT / "data").iterdir():
        if layer.is_dir():
            (dest / "data" / layer.name).mkdir(parents=True, exist_ok=True)
    if with_images:
        raw = make_bach_subset(dest / "data" / "01_raw" / "images",
                               images_per_patient=IMAGES_PER_PATIENT,
                               patients_per_class=PATIENTS_PER_CLASS)
        for patient in sorted(raw.glob("*/*")):  # P00 -> Ben-P00: one id per real patient
            patient.rename(patient.with_name(f"{patient.parent.name[:3]}-{patient.name}"))
    return dest


def kedro(project: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Runs `kedro <args>` in the project folder and returns its captured output."""
    return subprocess.run([KEDRO, *args], cwd=project, env=run_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)


@dataclass
class TrainedProject:
    path: Path
    runs: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)


_trained: TrainedProject | None = None
_failure: str | None = None


def trained_project(factory: pytest.TempPathFactory) -> TrainedProject:
    """`train_resnet34` (raw images to a logged model), then the `resnet50` model half on the
    same data: once per session, whichever test asks first."""
    global _trained, _failure  # noqa: PLW0603
    if _failure is not None:  # failed once: every dependent test says why, none retrains
        pytest.fail(_failure)
    if _trained is None:
        project = TrainedProject(make_project(factory.mktemp("trained") / "project"))
        for pipeline in ("train_resnet34", "resnet50"):
            result = kedro(project.path, "run", "--env=tiny", f"--pipeline={pipeline}")
            project.runs[pipeline] = result
            if result.returncode != 0:
                _failure = (f"kedro run --pipeline={pipeline} failed:\n"
                            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
                pytest.fail(_failure)
        _trained = project
    return _trained
