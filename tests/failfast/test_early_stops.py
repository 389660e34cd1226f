"""`kedro run` stops early, in one line, and writes nothing, for each case of issue 14.

Each case runs `kedro run` as a user does (a subprocess in a copy of the project) and checks:
the exit code, that the output holds exactly one `Error:` line saying what is wrong and what to
do (and no traceback), and that nothing new was written: no data version, no model version, no
FINISHED MLflow run (for the pre-flight checks: no MLflow run at all). The seconds each case
took are printed (`pytest -s`).
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
from _tiny_project import kedro, make_project

from neuroblastoma_cnn.core.errors import ModelError
from neuroblastoma_cnn.hooks import preflight

pytestmark = pytest.mark.integration

VERSION = re.compile(r"\d{4}-\d\d-\d\dT\d\d\.\d\d\.\d\d\.\d{3}Z")


def written(project: Path) -> set[str]:
    """Every versioned artifact folder under data/ (what a run writes)."""
    return {p.relative_to(project).as_posix() for p in (project / "data").rglob("*")
            if p.is_dir() and VERSION.fullmatch(p.name)}


def runs(project: Path) -> list[tuple[str, str]]:
    """(name, status) of every MLflow run in the project's store."""
    db = project / "mlflow.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as connection:
        return connection.execute("SELECT name, status FROM runs ORDER BY start_time").fetchall()


def tags(project: Path, run_name: str) -> dict[str, str]:
    with sqlite3.connect(project / "mlflow.db") as connection:
        rows = connection.execute(
            "SELECT t.key, t.value FROM tags t JOIN runs r ON t.run_uuid = r.run_uuid "
            "WHERE r.name = ? ORDER BY r.start_time", (run_name,)).fetchall()
    return dict(rows)


def stops_in_one_line(project: Path, *args: str) -> tuple[str, float]:
    """Runs `kedro run ARGS`, checks it failed with exactly one `Error:` line and no traceback,
    and that it wrote nothing and finished no MLflow run; returns the line and the seconds."""
    before, runs_before = written(project), runs(project)
    started = time.perf_counter()
    result = kedro(project, "run", *args)
    seconds = time.perf_counter() - started
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, output[-3000:]
    assert "Traceback" not in output and "╭" not in output, output[-3000:]
    assert written(project) == before
    new_runs = runs(project)[len(runs_before):]
    assert all(status != "FINISHED" for _, status in new_runs), new_runs
    print(f"\nkedro run {' '.join(args)}: exit 1 after {seconds:.1f} s: {errors[0]}")
    return errors[0], seconds


@pytest.fixture(scope="module")
def raw_project(tmp_path_factory: pytest.TempPathFactory, bach_subset: Path) -> Path:
    """A project with the small BACH subset as raw images, nothing run yet."""
    project = make_project(tmp_path_factory.mktemp("early") / "project", with_images=False)
    shutil.copytree(bach_subset, project / "data" / "01_raw" / "images")
    return project


def test_a_mistyped_environment_is_named_with_the_existing_ones(raw_project: Path):
    line, _ = stops_in_one_line(raw_project, "--env=tinyy")
    assert "Environment 'tinyy' does not exist" in line
    assert re.search(r"Environments: .*\btiny\b", line)
    assert "MLflow" not in line and "mlflow" not in line
    assert runs(raw_project) == []


def test_another_keras_backend_is_refused_before_anything_runs(
        raw_project: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    line, _ = stops_in_one_line(raw_project, "--env=tiny", "--pipeline=train_resnet34")
    assert "KERAS_BACKEND=jax" in line and "unset KERAS_BACKEND" in line
    assert runs(raw_project) == []


def test_no_raw_images_points_to_the_layout(tmp_path: Path):
    project = make_project(tmp_path / "project", with_images=False)
    line, _ = stops_in_one_line(project, "--env=tiny", "--pipeline=train_resnet34")
    assert "The raw image folder 'data/01_raw/images' does not exist" in line
    assert "<Class>/<Patient>/<image>" in line
    if (project / "conf" / "demo").is_dir():
        assert "kedro run --env=demo" in line
    assert runs(project) == []
    (project / "data" / "01_raw" / "images" / "A").mkdir(parents=True)
    (project / "data" / "01_raw" / "images" / "A" / "notes.txt").write_text("no image")
    line, _ = stops_in_one_line(project, "--env=tiny", "--pipeline=ingestion")
    assert "No image in 'data/01_raw/images'" in line
    assert runs(project) == []


def test_a_missing_weights_file_stops_before_ingestion(raw_project: Path, tmp_path: Path):
    missing = tmp_path / "resnet50_notop.h5"
    line, _ = stops_in_one_line(raw_project, "--env=tiny", "--pipeline=train_resnet50",
                                "--params", f"resnet50.model.weights={missing}")
    assert f"resnet50.model.weights='{missing}': no such weights file" in line
    assert runs(raw_project) == []


def test_unreachable_imagenet_weights_stop_before_ingestion(kedro_project: Path, run_kedro,
                                                            monkeypatch, tmp_path: Path):
    """In process, with the network check answering "unreachable" and an empty Keras cache."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(preflight, "url_reachable", lambda url, timeout=5.0: False)
    with pytest.raises(ModelError, match=re.escape("resnet50.model.weights=imagenet: the")):
        run_kedro("train_resnet50",
                  runtime_params={"resnet50": {"model": {"weights": "imagenet"}}})
    assert written(kedro_project) == set()
    assert runs(kedro_project) == []


@pytest.mark.parametrize(("override", "expected"), [
    ("resnet34.training.optimizer=adamm", "resnet34.training.optimizer"),
    ("resnet34.training.lerning_rate=0.1", "resnet34.training.lerning_rate"),
    ("resnet34.training.epochs=-1", "resnet34.training.epochs"),
    ("ingestion.tile_sise=256", "ingestion.tile_sise"),
])
def test_a_bad_parameter_stops_before_anything_runs(raw_project: Path, override: str,
                                                    expected: str):
    line, _ = stops_in_one_line(raw_project, "--env=tiny", "--pipeline=train_resnet34",
                                "--params", override)
    assert expected in line
    assert runs(raw_project) == []


def test_an_empty_prediction_folder_stops_before_the_model_loads(raw_project: Path):
    (raw_project / "data" / "01_raw" / "predict").mkdir(parents=True, exist_ok=True)
    assert not any((raw_project / "data" / "01_raw" / "predict").iterdir())
    line, _ = stops_in_one_line(raw_project, "--env=tiny", "--pipeline=predict")
    assert line.startswith("Error: The folder 'data/01_raw/predict' (images_to_predict) holds "
                           "no file")
    assert runs(raw_project) == []


def test_inputs_from_two_lineages_name_the_versions_and_the_fix(raw_project: Path):
    """The issue's case: `data_processing`, then `ingestion` alone, then the model half."""
    for pipeline in ("data_processing", "ingestion"):
        result = kedro(raw_project, "run", "--env=tiny", f"--pipeline={pipeline}")
        assert result.returncode == 0, result.stderr[-3000:]
    tiles = sorted((raw_project / "data/03_primary/tiles").iterdir())
    assert len(tiles) == 2
    old, new = tiles[0].name, tiles[1].name
    line, _ = stops_in_one_line(raw_project, "--env=tiny", "--pipeline=resnet34")
    assert line == (
        f"Error: The inputs of pipeline resnet34 come from different versions of tiles: it "
        f"loads tiles {new}, but augmented_train_tiles and split_table were made from tiles "
        f"{old} (rerun `kedro run --pipeline=data_processing` to remake them together, or pin "
        "matching versions with --load-versions)")
    assert not (raw_project / "data/06_models").exists() or not any(
        (raw_project / "data/06_models").rglob("model.keras"))
    assert [name for name, _ in runs(raw_project)] == ["data_processing", "ingestion"]


def test_a_model_half_without_data_says_which_pipeline_makes_it(tmp_path: Path):
    project = make_project(tmp_path / "project", with_images=False)
    line, _ = stops_in_one_line(project, "--env=tiny", "--pipeline=resnet34")
    assert line == (
        "Error: No saved version of augmented_train_tiles (data/05_model_input/"
        "augmented_train_tiles), split_table (data/05_model_input/split_table.csv), tiles "
        "(data/03_primary/tiles) (run `kedro run --pipeline=data_processing` first)")


def test_a_project_error_inside_a_node_is_one_line_and_fails_the_run(raw_project: Path):
    """A corrupt model file given to the predict pipeline: the node raises a ModelError."""
    predict_dir = raw_project / "data" / "01_raw" / "predict"
    predict_dir.mkdir(parents=True, exist_ok=True)
    image = next((raw_project / "data" / "01_raw" / "images").rglob("*.png"))
    shutil.copy(image, predict_dir / image.name)
    corrupt = raw_project / "corrupt.keras"
    corrupt.write_bytes(b"\x00" * 4096)
    line, _ = stops_in_one_line(raw_project, "--env=tiny", "--pipeline=predict",
                                "--params", f"predict.model={corrupt}")
    assert "is not a Keras model: not a .keras zip archive" in line
    assert "not found" not in line.lower()
    assert runs(raw_project)[-1] == ("predict", "FAILED")
    assert "is not a Keras model" in tags(raw_project, "predict")["failure_reason"]


def test_an_unexpected_error_keeps_its_traceback(raw_project: Path):
    """A bug (here: a tile store damaged by hand) is not the user's to fix in one line."""
    store = sorted((raw_project / "data/03_primary/tiles").iterdir())[-1] / "tiles"
    (store / "store.json").write_text("{not json")
    result = kedro(raw_project, "run", "--env=tiny", "--pipeline=splitting")
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "Traceback" in output or "╭" in output
    assert not any(line.startswith("Error: ") for line in output.splitlines())
