"""Shared fixtures: a small real H&E subset from BACH and a throw-away copy of the Kedro project.

Nothing derived from BACH is written inside the repository: subsets and project copies live in
pytest's temporary folders (the data's licence forbids committing anything cut from it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from PIL import Image

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# As the package sets it (runtime/parallel.py), before anything here loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BACH_DIR = Path(os.environ.get("BACH_DIR", PROJECT_ROOT.parent / "shared" / "data" / "bach"))

# The subset: per class, PATIENTS_PER_CLASS folders of IMAGES_PER_PATIENT images, downscaled by
# DOWNSCALE (2048x1536 -> 256x192), so that tests see real tissue at a size that runs in seconds.
IMAGES_PER_PATIENT = 2
PATIENTS_PER_CLASS = 3
DOWNSCALE = 8


def _require_bach() -> Path:
    if not (BACH_DIR / "manifest.csv").exists():
        message = f"BACH test data not found at '{BACH_DIR}' (set BACH_DIR to its folder)."
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return BACH_DIR


def make_bach_subset(
    dest: Path,
    images_per_patient: int = IMAGES_PER_PATIENT,
    patients_per_class: int = PATIENTS_PER_CLASS,
    downscale: int = DOWNSCALE,
) -> Path:
    """Writes ``dest/<Class>/<Pnn>/<file>.png`` from the first BACH images of every class."""
    bach = _require_bach()
    for class_dir in sorted(p for p in (bach / "images").iterdir() if p.is_dir()):
        files = sorted(class_dir.glob("*.jpg"))[: images_per_patient * patients_per_class]
        for i, src in enumerate(files):
            # Patient ids unique across classes: one patient, one diagnosis.
            patient = dest / class_dir.name / f"{class_dir.name}-P{i // images_per_patient:02d}"
            patient.mkdir(parents=True, exist_ok=True)
            with Image.open(src) as im:
                size = (im.width // downscale, im.height // downscale)
                im.draft("RGB", size)  # JPEG decodes straight at reduced scale: fast
                im.convert("RGB").resize(size, Image.Resampling.LANCZOS).save(
                    patient / f"{src.stem}.png"
                )
    return dest


SHELL_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


@pytest.fixture(autouse=True)
def _own_mlflow_tracking_uri() -> Any:
    """Each test leaves the tracking URI as the shell gave it to the test session.

    ``mlflow.set_tracking_uri`` (called by tests, and by kedro-mlflow in in-process runs, also
    those of module-scoped fixtures) exports ``MLFLOW_TRACKING_URI``, which every later ``kedro
    run`` subprocess or notebook kernel would inherit and obey: it would log into or read an
    earlier test's store.
    """
    yield
    mlflow.set_tracking_uri(SHELL_TRACKING_URI)  # None unsets the variable too
    if SHELL_TRACKING_URI is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def bach_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only-by-convention folder of real tissue: 4 classes x 3 patients x 2 images."""
    return make_bach_subset(tmp_path_factory.mktemp("bach") / "images")


@pytest.fixture
def kedro_project(tmp_path: Path, bach_subset: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the project (pyproject + conf) in a temp folder, with the subset as raw data.

    Tests chdir into it so that every relative catalog path, and MLflow's sqlite store, land there.
    """
    from _tiny_project import make_project  # noqa: PLC0415  (it imports this module)

    project = make_project(tmp_path / "project", images=bach_subset, tracking_in_conf=True)
    monkeypatch.chdir(project)
    return project


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The session's tiny trained project (`train_resnet34`, then the `resnet50` half): read
    it, never run pipelines in it (take `trained_copy` for that). Built by the first test that
    asks; if building fails, every test that asks fails with that build's error."""
    from _tiny_project import trained_project  # noqa: PLC0415

    return trained_project(tmp_path_factory)


@pytest.fixture
def trained_copy(trained: Any, tmp_path: Path) -> Path:
    """This test's own copy of the trained project, to run more pipelines in."""
    from _tiny_project import copy_project  # noqa: PLC0415

    return copy_project(trained.path, tmp_path / "trained" / "project")


@pytest.fixture(scope="session")
def run_kedro() -> Callable[..., dict[str, Any]]:
    """Runs pipelines in-process, as ``kedro run`` would, in the current project folder."""

    def _run(
        pipeline: str,
        env: str = "tiny",
        load_versions: dict[str, str] | None = None,
        runtime_params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        project = Path.cwd()
        bootstrap_project(project)
        with KedroSession.create(
            project_path=project, env=env, runtime_params=runtime_params
        ) as session:
            outputs = session.run(pipeline_names=[pipeline], load_versions=load_versions or {})
        active = mlflow.active_run()
        assert active is None, f"kedro run left MLflow run {active.info.run_id} open"
        return outputs

    return _run

