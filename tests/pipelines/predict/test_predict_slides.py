"""Prediction on whole-slide images: tiles streamed with coordinates, the slide's class as the
mean of its tiles with each class's share, heatmaps, the Grad-CAM gallery, the QuPath GeoJSON
(read back: the same tiles and classes), the same predictions through OpenSlide and tiffslide,
and the command."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from _params import params, store_metadata
from _slides import BACH_DIR, bach_image, side_by_side, write_slide, write_svs
from _tiny_project import latest
from PIL import Image

from neuroblastoma_cnn.cli.commands import main
from neuroblastoma_cnn.datasets import save_keras_model
from neuroblastoma_cnn.images.annotations import read_qupath_geojson
from neuroblastoma_cnn.images.decoding import ImageRejected
from neuroblastoma_cnn.images.preprocessing import Preprocessing, attach_preprocessing
from neuroblastoma_cnn.images.slides import READER_VARIABLE, Slide
from neuroblastoma_cnn.pipelines.predict import nodes
from neuroblastoma_cnn.serving import slide_tiles

pytestmark = pytest.mark.skipif(not (BACH_DIR / "images").is_dir(), reason="no BACH images")

CLASSES = ["Benign", "Invasive"]
PREDICT = params("predict", workers=1, batch_size=16, gradcam=True, slide_thumbnail_side=200,
                 slide_gallery_tiles=3)


def tiny_model(**tiling: object) -> keras.Model:
    """A random conv net on 32 px tiles with a record: 64 px tiles (or ``tiling``)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    record = Preprocessing.from_dict(store_metadata(CLASSES, 32, 64))
    record = record.model_copy(update={
        "architecture": "resnet34", "tiling": record.tiling.model_copy(update=tiling)})
    attach_preprocessing(model, record, "tiny model")
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("predict")
    pixels = side_by_side([bach_image("Benign"), bach_image("Invasive")], margin=32)
    slide = write_slide(root / "two.tif", pixels, mpp=0.5)
    crop = root / "crop.png"
    Image.fromarray(bach_image("Benign", 1)).save(crop)
    white = write_slide(root / "white.tif", np.full((256, 256, 3), 250, np.uint8))
    cut = root / "cut.svs"
    data = slide.read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    nores = write_slide(root / "nores.tif", pixels, mpp=None)
    svs = write_svs(root / "two.svs", pixels, mpp=0.5)
    return [(p.name, p) for p in (slide, crop, white, cut, nores, svs)]


def test_a_slide_is_predicted_from_its_tiles(files) -> None:
    progress: dict[str, list[int]] = {}

    def tile_progress(name: str, total: int):
        progress[name] = [total, 0]
        return lambda n: progress[name].__setitem__(1, progress[name][1] + n)

    model = tiny_model(tile_um=32.0)
    predictions, tiles = nodes.predict_files(files, model, PREDICT, tile_progress=tile_progress)
    rows = predictions.set_index("file")
    assert rows.loc["cut.svs", "rejected"]
    assert rows.loc["cut.svs", "reason"].startswith(("unreadable slide", "truncated"))
    assert rows.loc["nores.tif", "reason"].startswith("no slide resolution")
    assert rows.loc["white.tif", "mostly_background"]
    slide = tiles[tiles["file"] == "two.tif"]
    assert progress["two.tif"] == [len(slide)] * 2
    assert set(slide["level"]) == {1} and set(slide["tile_px"]) == {64}
    assert set(slide["mpp"]) == {0.5}
    mean = slide[["prob_Benign", "prob_Invasive"]].mean()
    assert rows.loc["two.tif", "prob_Benign"] == pytest.approx(mean["prob_Benign"])
    assert rows.loc["two.tif", "n_tiles"] == len(slide)
    shares = rows.loc["two.tif", ["share_Benign", "share_Invasive"]]
    assert shares.sum() == pytest.approx(1.0)
    crop_tiles = tiles[tiles["file"] == "crop.png"]
    assert len(crop_tiles) == 12 and crop_tiles["level"].isna().all()


def test_a_slide_failing_half_way_is_rejected_and_the_others_kept(files, monkeypatch) -> None:
    original, reads = Slide.read_region, []

    def fail_late(self, x, y, level, width, height):  # the third row of tiles is cut
        reads.append(level)
        if level == 1 and reads.count(1) % 3 == 0:
            raise ImageRejected(self.name, "truncated or corrupt image: level 1 cut")
        return original(self, x, y, level, width, height)

    monkeypatch.setattr(Slide, "read_region", fail_late)
    monkeypatch.setattr(  # tissue: level 2
        "neuroblastoma_cnn.images.slides.TISSUE_PIXELS_PER_TILE", 16)
    monkeypatch.setattr(slide_tiles, "CHUNK_TILES", 8)  # two chunks predicted before the cut
    chosen = [f for f in files if f[0] in ("crop.png", "two.tif")]
    predictions, tiles = nodes.predict_files(chosen[::-1] + chosen, tiny_model(),
                                             PREDICT.model_copy(update={"batch_size": 5}))
    assert predictions["rejected"].tolist() == [False, True, True, False]
    assert predictions.loc[1, "reason"] == "truncated or corrupt image: level 1 cut"
    assert set(tiles["file"]) == {"crop.png"} and len(tiles) == 24
    alone, _ = nodes.predict_files(chosen[::-1], tiny_model(), PREDICT)
    assert predictions.loc[0, "prob_Benign"] == pytest.approx(alone.loc[0, "prob_Benign"])


def test_crop_outputs_unchanged_without_a_slide(files) -> None:
    model = tiny_model()
    crop = [f for f in files if f[0] == "crop.png"]
    predictions, tiles = nodes.predict_files(crop, model, PREDICT)
    assert "share_Benign" not in predictions.columns and "level" not in tiles.columns


def test_heatmap_and_gallery_of_a_slide(files) -> None:
    model = tiny_model()
    slide = [f for f in files if f[0] == "two.tif"]
    predictions, tiles = nodes.predict_files(slide, model, PREDICT)
    heatmaps = nodes.slide_heatmaps(slide, model, predictions, tiles, PREDICT)
    picture = heatmaps["two.tif"]()  # a wide slide: thumbnail + one panel per class, stacked
    assert picture.size[0] == 200 and picture.size[1] > 3 * 80
    gallery = nodes.gradcam_overlays(slide, model, predictions, PREDICT, tiles)["two.tif"]()
    assert gallery.size[0] == 3 * 32 + 2 * 6  # the three most confident tiles
    assert nodes.heatmap_name("a/two.tif") == "a/two.tif.heatmap.png"


def test_the_slide_geojson_reads_back_as_the_same_tiles_and_classes(files) -> None:
    model = tiny_model(tile_um=32.0)
    chosen = [f for f in files if f[0] in ("two.tif", "crop.png")]
    predictions, tiles = nodes.predict_files(chosen, model, PREDICT)
    tiles["refer"] = tiles["prob_Benign"] < 0.6  # as conformal prediction would add them
    tiles["prediction_set"] = np.where(tiles["refer"], "Benign|Invasive", "Benign")
    written = nodes.write_slide_geojson(model, predictions, tiles)
    assert list(written) == ["two.tif.geojson"]  # slides only
    text = json.dumps(written["two.tif.geojson"]).encode()
    back = read_qupath_geojson(text, "two.tif.geojson", object_types=("detection",))
    slide = tiles[tiles["file"] == "two.tif"].reset_index(drop=True)
    assert len(back.regions) == len(slide) > 10
    top = np.where(slide["prob_Benign"] >= slide["prob_Invasive"], "Benign", "Invasive")
    for region, tile, label in zip(back.regions, slide.itertuples(), top, strict=True):
        assert region.geometry.bounds == (tile.x, tile.y, tile.x + 64, tile.y + 64)
        assert region.label == label
    features = written["two.tif.geojson"]["features"]
    first = features[0]["properties"]
    assert first["objectType"] == "detection" and len(first["classification"]["color"]) == 3
    assert first["measurements"]["prob_Benign"] == pytest.approx(slide.loc[0, "prob_Benign"])
    assert first["measurements"]["refer"] == float(slide.loc[0, "refer"])
    assert first["metadata"]["prediction_set"] == slide.loc[0, "prediction_set"]
    summary = features[-1]["properties"]
    row = predictions.set_index("file").loc["two.tif"]
    assert summary["objectType"] == "annotation" and summary["isLocked"]
    assert summary["classification"]["name"] == row["predicted"]
    assert summary["measurements"]["share_Invasive"] == pytest.approx(row["share_Invasive"])
    assert summary["measurements"]["n_tiles"] == len(slide)
    whole = read_qupath_geojson(text, "two.tif.geojson").regions[0].geometry.bounds
    assert whole == (slide["x"].min(), slide["y"].min(), slide["x"].max() + 64,
                     slide["y"].max() + 64)


@pytest.mark.parametrize("name", ["two.tif", "two.svs"])
def test_openslide_and_tiffslide_give_the_same_predictions(files, name, monkeypatch) -> None:
    """Same tiles, same probabilities: the lossless TIFF exactly, the JPEG SVS within 0.01 (the
    readers decode JPEG alike here; another JPEG build may differ by a grey level)."""
    pytest.importorskip("openslide")
    model = tiny_model(tile_um=32.0)
    chosen = [f for f in files if f[0] == name]
    results = {}
    for reader in ("openslide", "tiffslide"):
        monkeypatch.setenv(READER_VARIABLE, reader)
        results[reader] = nodes.predict_files(chosen, model, PREDICT)
    (p_open, t_open), (p_tiff, t_tiff) = results["openslide"], results["tiffslide"]
    assert not p_open["rejected"].any() and len(t_open) > 10
    assert t_open[["x", "y", "level"]].equals(t_tiff[["x", "y", "level"]])
    tolerance = 0.0 if name.endswith(".tif") else 0.01
    columns = ["prob_Benign", "prob_Invasive"]
    assert np.abs(t_open[columns].to_numpy() - t_tiff[columns].to_numpy()).max() <= tolerance
    assert p_open["predicted"].tolist() == p_tiff["predicted"].tolist()


def test_the_command_predicts_a_slide(files, tmp_path) -> None:
    model_path = tmp_path / "tiny.keras"
    save_keras_model(tiny_model(), model_path)
    slide = str(dict(files)["two.tif"])
    out, heat, cams = tmp_path / "p.csv", tmp_path / "heat", tmp_path / "cams"
    code = main(["predict", slide, "-m", str(model_path), "-o", str(out), "--heatmaps",
                 str(heat), "--gradcam", str(cams), "-q"])
    assert code == 0
    table = pd.read_csv(out)
    assert table.loc[0, "predicted"] in CLASSES and "share_Invasive" in table.columns
    assert (heat / "two.tif.heatmap.png").is_file() and (cams / "two.tif.png").is_file()
    assert json.loads((heat / "two.tif.geojson").read_text())["type"] == "FeatureCollection"


def test_the_command_writes_the_geojson_beside_the_tiles(files, tmp_path, capsys) -> None:
    model_path = tmp_path / "tiny.keras"
    save_keras_model(tiny_model(), model_path)
    slide, crop = str(dict(files)["two.tif"]), str(dict(files)["crop.png"])
    tiles_out = tmp_path / "out" / "tiles.csv"
    args = ["predict", slide, crop, "-m", str(model_path), "-o", str(tmp_path / "p.csv"),
            "--tiles-out", str(tiles_out)]
    assert main(args) == 0
    assert sorted(p.name for p in tiles_out.parent.iterdir()) == ["tiles.csv", "two.tif.geojson"]
    assert "1 slide(s) for QuPath" in capsys.readouterr().err
    tiles_out.unlink()
    (tmp_path / "p.csv").unlink()
    assert main(args) == 2  # the GeoJSON is not replaced without --overwrite
    assert "two.tif.geojson' exists; pass --overwrite" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.slow
def test_the_predict_pipeline_predicts_slides_beside_crops(files, kedro_project, run_kedro
                                                           ) -> None:
    model_path = kedro_project / "tiny.keras"
    save_keras_model(tiny_model(), model_path)
    folder = kedro_project / "data" / "01_raw" / "predict"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("two.tif", "crop.png"):
        (folder / name).write_bytes(dict(files)[name].read_bytes())
    run_kedro("predict", runtime_params={"predict": {"model": str(model_path), "workers": 1}})
    predictions = pd.read_csv(latest(kedro_project / "data/07_model_output/predictions.csv"))
    assert predictions["rejected"].tolist() == [False, False]
    assert predictions["share_Benign"].notna().all()
    heatmaps = latest(kedro_project / "data/08_reporting/slide_heatmaps")
    assert [p.name for p in heatmaps.rglob("*.png")] == ["two.tif.heatmap.png"]
    cams = latest(kedro_project / "data/08_reporting/gradcam")
    assert sorted(p.name for p in cams.rglob("*.png")) == ["crop.png.png", "two.tif.png"]
    geojson = latest(kedro_project / "data/07_model_output/slide_geojson")
    assert [p.name for p in geojson.rglob("*.geojson")] == ["two.tif.geojson"]
