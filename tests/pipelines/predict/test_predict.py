"""Prediction on new images: the `predict` pipeline, the `neuroblastoma-cnn` command, Grad-CAM.

The tiny ResNet34 of the session's trained project (`train_resnet34` in the tiny environment)
predicts, in a copy of that project made once for the module. The images to classify are
real BACH tissue (copies of training images, so their tiles can be checked against the tile
store pixel for pixel) mixed with files that must be rejected, not fatal.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from _tiny_project import TrainedProject, copy_project, latest
from click.testing import CliRunner
from kedro.framework.cli.cli import KedroCLI
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from PIL import Image

from neuroblastoma_cnn.analysis.predictions import PROB_PREFIX
from neuroblastoma_cnn.core.errors import ModelError, ParameterError
from neuroblastoma_cnn.datasets import TileStore, TrainedModels, load_keras_model, save_keras_model
from neuroblastoma_cnn.datasets.trained_models import ModelSelectionError
from neuroblastoma_cnn.images.preprocessing import (
    Preprocessing,
    attach_preprocessing,
    preprocessing_of,
)
from neuroblastoma_cnn.params import PredictParams, base_group
from neuroblastoma_cnn.pipelines.predict import create_pipeline
from neuroblastoma_cnn.pipelines.predict.nodes import (
    list_image_files,
    predict_files,
    prepare_image,
)

PROJECT_ROOT = Path(__file__).resolve().parents[3]
PREDICT = PredictParams.parse(base_group("predict"), "predict")
CLI = Path(sys.executable).with_name("neuroblastoma-cnn")
PREDICT_DIR = Path("data/01_raw/predict")
# name in the prediction folder -> reason prefix it must be rejected with
BAD_FILES = {
    "notes.txt": "not an image extension",
    "deep/er/broken.png": "not a readable image",
    "truncated.png": "truncated or corrupt image",
    "tiny.png": "too small",
}

pytestmark = [pytest.mark.integration, pytest.mark.slow]


# ----------------------------------------------------------------------------- helpers


def _read_predictions(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, na_values=[""],
                       dtype={"file": str, "predicted": str, "reason": str, "model": str})


def _run(pipeline: str, runtime_params: dict[str, Any] | None = None) -> None:
    bootstrap_project(Path.cwd())
    with KedroSession.create(project_path=Path.cwd(), env="tiny",
                             runtime_params=runtime_params) as session:
        session.run(pipeline_names=[pipeline])
    assert mlflow.active_run() is None, "kedro run left an MLflow run open"


def _run_predict(runtime_params: dict[str, Any] | None = None) -> pd.DataFrame:
    before = set(Path("data/07_model_output/predictions.csv").glob("*"))
    _run("predict", runtime_params)
    new = set(Path("data/07_model_output/predictions.csv").glob("*")) - before
    assert len(new) == 1, "one run, one new predictions version"
    return _read_predictions(next(iter(new)) / "predictions.csv")


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    if not CLI.exists():  # the console script appears once the package is (re)installed
        subprocess.run([sys.executable, "-m", "pip", "install", "-e", str(PROJECT_ROOT), "-q",
                        "--no-deps"], check=True, capture_output=True)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)


def _prob_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith(PROB_PREFIX)]


def _write_bad_files(folder: Path, real_png: Path) -> None:
    (folder / "notes.txt").write_text("not an image")
    (folder / "deep" / "er").mkdir(parents=True)
    (folder / "deep" / "er" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    data = real_png.read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (50, 50), (200, 80, 160)).save(folder / "tiny.png")
    Image.new("RGB", (256, 192), "white").save(folder / "white.png")  # glass only
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # skipped, not a row


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, trained: TrainedProject) -> Iterator[Path]:
    """A copy of the session's trained project (tiny ResNet34 and ResNet50) and a prediction
    folder (good + bad files); the working directory for the whole module. `predict` has run
    once with the defaults. Its ResNet50 is removed, so that asking for it gives the message
    that says how to train one."""
    root = copy_project(trained.path, tmp_path_factory.mktemp("predict") / "project")
    shutil.rmtree(root / "data" / "06_models" / "resnet50")
    raw = root / "data" / "01_raw" / "images"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        predict_dir = root / PREDICT_DIR
        for i, image in enumerate(sorted(raw.rglob("*.png"))[::7]):
            target = predict_dir / ("batch" if i % 2 else "nested/slide") / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, target)
        _write_bad_files(predict_dir, next(raw.rglob("*.png")))
        _run("predict")
        yield root


@pytest.fixture(scope="module")
def predictions(project: Path) -> pd.DataFrame:
    return _read_predictions(latest(project / "data/07_model_output/predictions.csv"))


@pytest.fixture(scope="module")
def model(project: Path) -> Any:
    return TrainedModels(project / "data/06_models").load("resnet34")


# ----------------------------------------------------------------------------- pipeline


def test_pipeline_predicts_every_file_and_flags_bad_ones(project: Path, predictions):
    files = {name for name, _ in list_image_files(PREDICT_DIR)}
    assert set(predictions["file"]) == files
    assert ".DS_Store" not in files and len(files) == len(predictions)
    assert predictions["file"].is_unique

    rejected = predictions.set_index("file").loc[list(BAD_FILES)]
    assert rejected["rejected"].all()
    for name, prefix in BAD_FILES.items():
        assert rejected.loc[name, "reason"].startswith(prefix), rejected.loc[name, "reason"]
    assert rejected[_prob_columns(predictions)].isna().all().all()

    good = predictions[~predictions["rejected"]]
    assert len(good) == len(files) - len(BAD_FILES) >= 5
    classes = TileStore(latest(project / "data/03_primary/tiles")).metadata["classes"]
    assert _prob_columns(good) == [f"{PROB_PREFIX}{c}" for c in classes]
    prob = good[_prob_columns(good)].to_numpy(dtype=float)
    np.testing.assert_allclose(prob.sum(axis=1), 1.0, atol=1e-6)
    assert list(good["predicted"]) == [classes[i] for i in prob.argmax(axis=1)]
    assert (good["low_confidence"] == (prob.max(axis=1) < PREDICT.min_confidence)).all()
    assert good["reason"].isna().all()

    white = good.set_index("file").loc["white.png"]
    assert white["mostly_background"] and white["n_tiles"] >= 1
    assert not good.loc[good["file"] != "white.png", "mostly_background"].any()


def test_image_result_is_the_mean_of_its_tiles(project: Path, predictions):
    tiles = pd.read_csv(latest(project / "data/07_model_output/predicted_tiles.csv"))
    good = predictions[~predictions["rejected"]].set_index("file")
    columns = _prob_columns(good)
    means = tiles.groupby("file")[columns].mean()
    counts = tiles.groupby("file").size()
    assert set(means.index) == set(good.index)
    np.testing.assert_allclose(good.loc[means.index, columns].to_numpy(float), means.to_numpy(),
                               atol=1e-9)
    assert (good.loc[counts.index, "n_tiles"] == counts).all()


def test_new_images_are_tiled_exactly_like_training_images(project: Path, model, predictions):
    """The prediction folder holds copies of training images: their tiles must be the tile
    store's, pixel for pixel, and get the probabilities the model gives the stored tiles."""
    store = TileStore(latest(project / "data/03_primary/tiles"))
    tiles = pd.read_csv(latest(project / "data/07_model_output/predicted_tiles.csv"))
    preprocessing = preprocessing_of(model)
    checked = 0
    for name, path in list_image_files(PREDICT_DIR):
        source = store.index[store.index["image_path"].str.endswith("/" + Path(name).name)]
        if source.empty:
            continue
        source = source.sort_values(["y", "x"])
        prepared = prepare_image(path, name, preprocessing, fallback_tiles=3)
        assert prepared.positions == list(zip(source["x"], source["y"], strict=True))
        assert np.array_equal(prepared.tiles, store.get(source["tile_id"].tolist()))
        expected = model.predict(prepared.tiles.astype("float32"), verbose=0)
        mine = tiles[tiles["file"] == name].sort_values(["y", "x"])
        np.testing.assert_allclose(mine[_prob_columns(mine)].to_numpy(), expected, atol=1e-5)
        checked += 1
    assert checked >= 5


def test_pipeline_writes_gradcam_overlays_and_never_reads_ingestion_params(project, predictions):
    assert "params:ingestion" not in create_pipeline().inputs()
    overlays = latest(project / "data/08_reporting/gradcam")
    written = sorted(p.relative_to(overlays).as_posix() for p in overlays.rglob("*.png"))
    good = predictions.loc[~predictions["rejected"], "file"]
    assert written == sorted(f"{f}.png" for f in good)
    with Image.open(overlays / "white.png.png") as picture:
        assert picture.mode == "RGB" and picture.width == 256  # tiny: gradcam_max_side 256


def test_evaluation_logs_a_misclassified_gallery(project: Path):
    gallery = latest(project / "data/08_reporting/resnet34/misclassified_gallery.png")
    with Image.open(gallery) as picture:
        assert picture.width > 100 and picture.height > 100
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["neuroblastoma_cnn_tiny"],
                             filter_string="attributes.run_name = 'train_resnet34'",
                             output_format="list")[0]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id,
                                                                     "resnet34")}
    assert "resnet34/misclassified_gallery.png" in artifacts


# ----------------------------------------------------------------------------- model selection


def test_model_selection_latest_given_version_and_mlflow_uri(project: Path, model, predictions):
    models = TrainedModels("data/06_models")
    (first,) = models.versions("resnet34")
    assert predictions["model"].eq(models.path("resnet34").as_posix()).all()

    # A newer version (weights changed so that it predicts the last class) becomes the default.
    newer = load_keras_model(models.path("resnet34"))
    dense = newer.layers[-1]
    bias = np.zeros(dense.bias.shape, "float32")
    bias[-1] = 50.0
    dense.kernel.assign(np.zeros(dense.kernel.shape, "float32"))  # logits = bias, whatever
    dense.bias.assign(bias)  # the features: a tiny model's can be large enough to outvote it
    newer.preprocessing = dict(model.preprocessing)
    newer_version = "9999-01-01T00.00.00.000Z"
    save_keras_model(newer, Path("data/06_models/resnet34/model.keras") / newer_version /
                     "model.keras")
    try:
        newest = _run_predict()
        last_class = _prob_columns(newest)[-1][len(PROB_PREFIX):]
        good = newest[~newest["rejected"]]
        assert (good["predicted"] == last_class).all()
        assert good["model"].str.contains(newer_version).all()

        pinned = _run_predict({"predict": {"version": first}})
        pd.testing.assert_frame_equal(pinned, predictions)
    finally:
        shutil.rmtree(Path("data/06_models/resnet34/model.keras") / newer_version)

    with pytest.raises(ModelSelectionError, match="No version 'nope'"):
        models.load("resnet34", "nope")
    with pytest.raises(ModelSelectionError, match="Run `kedro run --pipeline=train_resnet50`"):
        models.load("resnet50")

    # The model logged to MLflow by the training run, registered, gives the same predictions.
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["neuroblastoma_cnn_tiny"],
                             filter_string="attributes.run_name = 'train_resnet34'",
                             output_format="list")[0]
    registered = mlflow.register_model(run.data.tags["resnet34.model_uri"], "tiny_resnet34")
    uri = f"models:/tiny_resnet34/{registered.version}"
    from_mlflow = _run_predict({"predict": {"model": uri}})
    assert (from_mlflow["model"] == uri).all()
    columns = _prob_columns(predictions)
    pd.testing.assert_frame_equal(from_mlflow.drop(columns=[*columns, "model"]),
                                  predictions.drop(columns=[*columns, "model"]))
    np.testing.assert_allclose(from_mlflow[columns].to_numpy(float),
                               predictions[columns].to_numpy(float), atol=1e-6)


# ----------------------------------------------------------------------------- the command


def test_command_help_is_fast_and_documents_exit_codes():
    started = time.perf_counter()
    result = _cli("predict", "--help")
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    assert "exit codes" in result.stdout and "--gradcam" in result.stdout
    assert seconds < 10, f"--help took {seconds:.1f}s: something heavy is imported first"
    assert _cli("--help").returncode == 0


def test_kedro_command_line_still_loads_with_the_cli_module():
    """Kedro imports `neuroblastoma_cnn.cli` for project commands: it must not break `kedro`."""
    result = CliRunner().invoke(KedroCLI(project_path=PROJECT_ROOT), ["run", "--help"])
    assert result.exit_code == 0, result.output
    assert "--pipeline" in result.output


def test_command_usage_errors_exit_2(project: Path, tmp_path: Path):
    missing = _cli("predict", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no such file or folder" in missing.stderr
    assert _cli("predict", str(PREDICT_DIR), "--batch-size", "0").returncode == 2
    unknown = _cli("predict", str(PREDICT_DIR), "--model", "resnet99")
    assert unknown.returncode == 2
    assert "'resnet99' is not a model this project trains" in unknown.stderr
    (tmp_path / "exists.csv").write_text("x")
    exists = _cli("predict", str(PREDICT_DIR), "--out", str(tmp_path / "exists.csv"))
    assert exists.returncode == 2 and "--overwrite" in exists.stderr
    (tmp_path / "empty").mkdir()
    assert _cli("predict", str(tmp_path / "empty")).returncode == 2


def test_command_gives_the_pipeline_results(project: Path, predictions, tmp_path: Path):
    out, overlays = tmp_path / "predictions.csv", tmp_path / "gradcam"
    tiny_batch = str(yaml.safe_load((project / "conf/tiny/parameters.yml").read_text())
                     ["predict"]["batch_size"])
    result = _cli("predict", str(PREDICT_DIR), "--out", str(out), "--gradcam", str(overlays),
                  "--batch-size", tiny_batch, "--gradcam-max-side", "256")
    assert result.returncode == 1, result.stderr  # the bad files are rejected
    assert "tiny.png: too small" in result.stderr
    from_cli = _read_predictions(out)
    from_cli["file"] = [Path(f).relative_to(PREDICT_DIR).as_posix() for f in from_cli["file"]]
    pd.testing.assert_frame_equal(from_cli, predictions)
    assert len(list(overlays.rglob("*.png"))) == int((~predictions["rejected"]).sum())

    good = [str(PREDICT_DIR / f) for f in predictions.loc[~predictions["rejected"], "file"][:2]]
    result = _cli("predict", *good, "--quiet")
    assert result.returncode == 0, result.stderr
    assert "files predicted" not in result.stderr  # --quiet: no summary, no bar
    printed = pd.read_csv(io.StringIO(result.stdout))
    assert list(printed["file"]) == good


# ----------------------------------------------------------------------------- units


def test_predict_parameters_come_from_the_parameters_file():
    params = yaml.safe_load((PROJECT_ROOT / "conf/base/parameters_predict.yml").read_text())
    assert PREDICT.model_dump() == params["predict"]
    with pytest.raises(ParameterError, match=r"predict.batchsize = 3: unknown key, did you mean"):
        PredictParams.parse({**params["predict"], "batchsize": 3}, "predict")
    with pytest.raises(ParameterError, match=r"predict.min_confidence = 2: must be <= 1"):
        PredictParams.parse({**params["predict"], "min_confidence": 2}, "predict")


def test_a_model_is_refused_without_a_matching_record(model, tmp_path: Path):
    record = model.preprocessing
    assert isinstance(record, Preprocessing)  # checked once, where the model was loaded
    try:
        model.preprocessing = {}
        with pytest.raises(ModelError, match="no preprocessing record"):
            predict_files([], model, PREDICT)
        changed = record.to_dict()
        changed["tiling"] = {**changed["tiling"], "input_size": 64}
        with pytest.raises(ModelError, match="input_size"):
            attach_preprocessing(model, changed, "changed")
    finally:
        model.preprocessing = record
    bare = tmp_path / "bare.keras"
    model.save(bare)  # a plain Keras save: no record inside
    with pytest.raises(ModelSelectionError, match="no preprocessing record"):
        TrainedModels(tmp_path).load(str(bare))


def test_a_model_saved_with_the_first_record_layout_still_loads(model, tmp_path: Path):
    """Models saved before the record was typed wrote the tiling twice (top level and under
    `ingestion`); they load and predict with the same settings."""
    record = model.preprocessing
    ingestion = {**base_group("ingestion"), **record.tiling.model_dump(),
                 **record.image_checks.model_dump()}
    legacy = {"classes": list(record.classes), "input_size": record.tiling.input_size,
              "tile_size": record.tiling.tile_size, "stride": record.tiling.effective_stride,
              "min_tissue_fraction": record.tiling.min_tissue_fraction,
              "tissue_rule": record.tiling.tissue_rule, "resize_filter": "bilinear",
              "n_images": 3, "ingestion": ingestion, "architecture": "resnet34"}
    try:
        model.preprocessing = legacy
        path = tmp_path / "legacy.keras"
        save_keras_model(model, path)
    finally:
        model.preprocessing = record
    loaded = TrainedModels(tmp_path).load(str(path))
    assert loaded.preprocessing == record
