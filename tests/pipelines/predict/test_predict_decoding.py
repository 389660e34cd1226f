"""Prediction decodes like ingestion did for the model (its record's ``decoding``), and its
decoding threads change nothing in the results. A stand-in model keeps this fast (no TensorFlow):
the tiles it is given are what is checked."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from _params import params
from PIL import Image

from neuroblastoma_cnn.datasets import write_tile_store
from neuroblastoma_cnn.images.decoding import decode_image
from neuroblastoma_cnn.images.preprocessing import Preprocessing, attach_preprocessing
from neuroblastoma_cnn.params import PredictParams, base_group
from neuroblastoma_cnn.pipelines.ingestion.nodes import build_image_manifest, tile_images
from neuroblastoma_cnn.pipelines.predict.nodes import list_image_files, predict_files, prepare_image

SETTINGS = {"extensions": [".png", ".jpg"], "min_image_size": 16, "tile_size": 64, "stride": 32,
            "min_tissue_fraction": 0.5, "input_size": 16, "shard_size": 7}


def make_raw(root: Path, n: int = 8) -> Path:
    for i in range(n):
        rng = np.random.default_rng(i)
        coarse = rng.integers(60, 200, (12, 16, 3), dtype=np.uint8)
        rgb = np.asarray(Image.fromarray(coarse).resize((256, 192), Image.Resampling.BICUBIC))
        rgb = rgb.copy()
        rgb[: 64 + 8 * i, :96] = 245  # glass, more in every image
        path = root / "AB"[i % 2] / f"img{i}.{'jpg' if i % 2 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, "JPEG" if i % 2 else "PNG")
        path.write_bytes(buffer.getvalue())
    return root


def ingest(root: Path, out: Path, decoding: str):  # type: ignore[no-untyped-def]
    settings = params("ingestion", **SETTINGS, decoding=decoding, workers=2)
    manifest, _ = build_image_manifest(root, settings)
    stream = tile_images(root, manifest, settings)
    return write_tile_store(out, stream, stream.metadata, shard_size=settings.shard_size)


class MeanColourModel:
    """Stands in for a Keras model: two 'probabilities' from each tile's mean colour."""

    input_shape = (None, 16, 16, 3)
    output_shape = (None, 2)

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []

    def predict_on_batch(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(np.array(batch))
        red = batch[..., 0].mean(axis=(1, 2)) / 255.0
        return np.stack([red, 1.0 - red], axis=1)


@pytest.mark.parametrize("decoding", ["reduced", "full"])
def test_prediction_tiles_are_the_store_tiles_pixel_for_pixel(tmp_path: Path,
                                                              decoding: str) -> None:
    root = make_raw(tmp_path / "raw")
    store = ingest(root, tmp_path / "store", decoding)
    record = Preprocessing.from_store(store)
    assert record.tiling.decoding == decoding
    checked = 0
    for name, path in list_image_files(root):
        rows = store.index[store.index["image_path"] == name].sort_values(["y", "x"])
        prepared = prepare_image(path, name, record, fallback_tiles=3)
        assert prepared.positions == list(zip(rows["x"], rows["y"], strict=True))
        assert np.array_equal(prepared.tiles, store.get(rows["tile_id"].tolist()))
        assert (prepared.width, prepared.height) == (256, 192)
        checked += 1
    assert checked == 8


def test_a_record_without_decoding_predicts_from_full_resolution(tmp_path: Path) -> None:
    """A model trained before reduced decoding existed: its record has no ``decoding``, so its
    new images are decoded at full resolution, as its training images were."""
    root = make_raw(tmp_path / "raw", n=2)
    record = Preprocessing.from_store(ingest(root, tmp_path / "store", "reduced")).to_dict()
    del record["tiling"]["decoding"]
    old = Preprocessing.from_dict(record)
    assert old.tiling.decoding == "full"
    path = root / "B" / "img1.jpg"
    prepared = prepare_image(path, "img1.jpg", old, fallback_tiles=3)
    native = decode_image(path.read_bytes(), "img1.jpg", 10**8)[0]
    expected = old.tiling.tile(native)  # the native decode, tiled and resized as before
    assert prepared.positions == [(t.x, t.y) for t in expected]
    np.testing.assert_array_equal(prepared.tiles, np.stack([t.tile for t in expected]))


def test_decoding_threads_change_nothing(tmp_path: Path) -> None:
    root = make_raw(tmp_path / "raw")
    (root / "B" / "notes.txt").write_text("not an image")
    record = Preprocessing.from_store(ingest(root, tmp_path / "store", "reduced"))
    files = list_image_files(root)
    results: dict[int, Any] = {}
    for workers in (1, 3):
        model = MeanColourModel()
        attach_preprocessing(model, record, "stand-in")
        settings = PredictParams.parse(
            base_group("predict", workers=workers, batch_size=5, gradcam=False), "predict")
        results[workers] = (*predict_files(files, model, settings), model.batches)
    (one, one_tiles, one_batches), (three, three_tiles, three_batches) = results[1], results[3]
    pd.testing.assert_frame_equal(one, three)
    pd.testing.assert_frame_equal(one_tiles, three_tiles)
    assert len(one_batches) == len(three_batches)
    for a, b in zip(one_batches, three_batches, strict=True):
        np.testing.assert_array_equal(a, b)
    assert list(one["file"]) == [name for name, _ in files]
    assert one.set_index("file").loc["B/notes.txt", "rejected"]
