"""Models on a real tiny training run: promoted only after evaluation, logged to MLflow under
the architecture's name and stored once; a run that fails after training leaves no model that
`predict` would pick; `predict` records the model it used; `prune` drops the failed leftovers.

The session's trained project (`train_resnet34`, then the `resnet50` half, subprocesses as a
user runs them) is read in place; the failing run (in process, with evaluation made to fail),
`predict` and `prune` run in one copy of it, in that order.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from _tiny_project import TrainedProject, copy_project, kedro
from click.testing import CliRunner
from kedro.pipeline.node import Node

from neuroblastoma_cnn.datasets import TileStore, TrainedModels, load_keras_model
from neuroblastoma_cnn.tracking import prune
from neuroblastoma_cnn.tracking.promotion import (
    read_status,
    single_class_reason,
    untrained_reasons,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODELS = Path("data/06_models/resnet34/model.keras")


@pytest.fixture
def project(trained: TrainedProject) -> Path:
    """The trained project, read only."""
    return trained.path


@pytest.fixture(scope="module")
def working(trained: TrainedProject, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of it in which a run fails, then `predict` runs, then `prune` deletes."""
    return copy_project(trained.path, tmp_path_factory.mktemp("promotion") / "project")


def _client(project: Path) -> mlflow.MlflowClient:
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.MlflowClient()


def _runs(project: Path, name: str) -> list[mlflow.entities.Run]:
    _client(project)
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"attributes.run_name = '{name}'",
                              order_by=["attributes.start_time ASC"])


def _unique_bytes(*folders: Path) -> tuple[int, int]:
    """(bytes on disk counting each inode once, bytes if every path were its own copy)."""
    seen, unique, apparent = set(), 0, 0
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                stat = path.stat()
                apparent += stat.st_size
                if (stat.st_dev, stat.st_ino) not in seen:
                    seen.add((stat.st_dev, stat.st_ino))
                    unique += stat.st_size
    return unique, apparent


def test_an_evaluated_model_is_promoted_and_logged_once(project: Path):
    (version,) = sorted(p.name for p in (project / MODELS).iterdir())
    folder = project / MODELS / version
    status = read_status(folder)
    assert status["status"] == "promoted" and status["epochs"] >= 1
    assert TrainedModels(project / "data/06_models").path("resnet34") == folder / "model.keras"

    (run,) = _runs(project, "train_resnet34")
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["resnet34.model_version"] == version
    assert tags["resnet34.model_uri"] == status["mlflow_model_uri"]
    logged = mlflow.get_logged_model(tags["resnet34.model_uri"].removeprefix("models:/"))
    assert logged.name == "resnet34"
    assert logged.source_run_id == run.info.run_id

    # Stored once: MLflow's data/model.keras and the raw-image pyfunc's artifacts/model.keras
    # are the catalog file (one inode, three names).
    artifact = Path(logged.artifact_location.removeprefix("file://")) / "data" / "model.keras"
    if not artifact.is_absolute():
        artifact = project / artifact
    catalog_file = folder / "model.keras"
    assert artifact.stat().st_ino == catalog_file.stat().st_ino
    assert catalog_file.stat().st_nlink == 3
    served = mlflow.get_logged_model(
        tags["resnet34_raw_images.model_uri"].removeprefix("models:/"))
    served_file = Path(served.artifact_location.removeprefix("file://")) / "artifacts" / \
        "model.keras"
    if not served_file.is_absolute():
        served_file = project / served_file
    assert served_file.stat().st_ino == catalog_file.stat().st_ino
    # resnet34's models and its two logged models (the project also holds resnet50's)
    unique, apparent = _unique_bytes(project / "data/06_models/resnet34",
                                     artifact.parents[1], served_file.parents[1])
    size = catalog_file.stat().st_size
    print(f"\nmodel file {size} bytes; models + MLflow artifacts: {unique} bytes on disk, "
          f"{apparent} bytes if stored twice")
    assert apparent - unique == 2 * size

    # The logged model loads and predicts as the catalog model does.
    tiles = TileStore(sorted((project / "data/03_primary/tiles").iterdir())[-1] / "tiles")
    sample = tiles.get(tiles.index["tile_id"][:4].tolist()).astype("float32")
    expected = load_keras_model(catalog_file).predict(sample, verbose=0)
    got = mlflow.pyfunc.load_model(tags["resnet34.model_uri"]).predict(sample)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


@pytest.mark.parametrize("model", ["resnet34", "resnet50"])
def test_the_model_records_the_three_versions_it_was_made_from(project: Path, model: str):
    """resnet34 was trained in the run that made the data; resnet50 in a later run on it."""
    folder = project / "data/06_models" / model / "model.keras"
    (version,) = sorted(p.name for p in folder.iterdir())
    record = json.loads((folder / version / "lineage.json").read_text())
    (data_run,) = _runs(project, "train_resnet34")
    data_version = data_run.data.tags["run_id"]
    assert {k: record["made_from"][k] for k in ("tiles", "split_table",
                                                "augmented_train_tiles")} == {
        "tiles": data_version, "split_table": data_version,
        "augmented_train_tiles": data_version}
    if model == "resnet50":
        (model_run,) = _runs(project, "resnet50")
        assert version == model_run.data.tags["run_id"] != data_version
    split = json.loads(next((project / "data/05_model_input/split_table.csv").glob(
        "*/lineage.json")).read_text())
    assert split["made_from"]["tiles"] == data_version
    augmented = json.loads(next((project / "data/05_model_input/augmented_train_tiles").glob(
        "*/lineage.json")).read_text())
    assert augmented["made_from"]["tiles"] == augmented["made_from"]["split_table"] \
        == data_version


def test_the_untrained_flag_follows_the_history(project: Path):
    (run,) = _runs(project, "train_resnet34")
    history = pd.read_csv(next((project / "data/06_models/resnet34/training_history.csv")
                               .glob("*/training_history.csv")))
    predictions = pd.read_csv(next((project / "data/07_model_output/resnet34/"
                                    "image_predictions.csv").glob("*/image_predictions.csv")))
    reasons = untrained_reasons(history)
    single_class = single_class_reason(predictions)  # the test-set check
    print(f"\nresnet34 val_loss per epoch: {history['val_loss'].tolist()}; untrained: {reasons}"
          f"; test set: {single_class}")
    assert ("resnet34.untrained" in run.data.tags) == bool(reasons or single_class)
    for reason in [*reasons, *([single_class] if single_class else [])]:
        assert reason in run.data.tags["resnet34.untrained"]


def test_a_run_failing_in_evaluation_leaves_no_usable_model(working: Path, run_kedro,
                                                            monkeypatch):
    project = working
    monkeypatch.chdir(project)
    promoted = TrainedModels(project / "data/06_models").versions("resnet34")
    original = Node.run

    def broken(self, inputs=None):
        if self.name == "resnet34.compute_test_metrics":
            raise RuntimeError("evaluation broke")
        return original(self, inputs)

    monkeypatch.setattr(Node, "run", broken)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        run_kedro("resnet34")
    versions = sorted(p.name for p in (project / MODELS).iterdir())
    assert len(versions) == 2
    status = read_status(project / MODELS / versions[-1])
    assert status["status"] == "failed"
    assert status["reason"] == "RuntimeError: evaluation broke"
    assert TrainedModels(project / "data/06_models").versions("resnet34") == promoted

    failed = _runs(project, "resnet34")[-1]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["failure_reason"] == "RuntimeError: evaluation broke"
    assert "resnet34.model_uri" not in failed.data.tags
    experiment = failed.info.experiment_id
    logged = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")
    # resnet34's models are the promoted run's only (the Keras flavour and its raw-image pyfunc)
    assert sorted((m.name, m.source_run_id) for m in logged if m.name.startswith("resnet34")) \
        == [(name, _runs(project, "train_resnet34")[0].info.run_id)
            for name in ("resnet34", "resnet34_raw_images")]
    assert failed.info.run_id not in {m.source_run_id for m in logged}


def test_predict_records_the_model_it_used_and_logs_its_table(working: Path):
    project = working
    predict_dir = project / "data" / "01_raw" / "predict"
    predict_dir.mkdir(parents=True, exist_ok=True)
    for image in sorted((project / "data" / "01_raw" / "images").rglob("*.png"))[:2]:
        shutil.copy(image, predict_dir / image.name)
    result = kedro(project, "run", "--env=tiny", "--pipeline=predict")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    (run,) = _runs(project, "predict")
    promoted = TrainedModels(project / "data/06_models").versions("resnet34")[-1]
    tags = run.data.tags
    assert tags["predict.model_version"] == promoted  # not the newer, failed version
    assert tags["predict.model"] == (MODELS / promoted / "model.keras").as_posix()
    assert tags["predict.model_uri"] == read_status(project / MODELS / promoted)[
        "mlflow_model_uri"]
    artifacts = [a.path for a in _client(project).list_artifacts(run.info.run_id, "predict")]
    assert artifacts == ["predict/predictions.csv"]


def test_prune_drops_the_failed_model_and_keeps_what_runs_use(working: Path, monkeypatch):
    project = working
    monkeypatch.chdir(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    failed, = [v for v in sorted(p.name for p in (project / MODELS).iterdir())
               if read_status(project / MODELS / v)["status"] == "failed"]
    before = {p for p in (project / "data").rglob("*") if p.is_dir()}
    dry = CliRunner().invoke(prune.prune, ["--keep", "1"])
    assert dry.exit_code == 0, dry.output
    listed = dry.output.splitlines()[:-1]
    assert f"Would delete {(MODELS / failed).as_posix()}" in listed
    assert all(line.endswith(failed) for line in listed), listed  # the failed run's leftovers
    assert {p for p in (project / "data").rglob("*") if p.is_dir()} == before
    done = CliRunner().invoke(prune.prune, ["--keep", "1", "--yes"])
    assert done.exit_code == 0, done.output
    assert not (project / MODELS / failed).exists()
    assert TrainedModels(project / "data/06_models").versions("resnet34")  # still there
    print(f"\n{done.output.splitlines()[-1]}")
    assert os.path.isdir(project / "data/03_primary/tiles")
