"""Prediction with test-time augmentation beside the plain columns, and tiles through the
model's stain reference."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from _params import params, store_metadata
from PIL import Image

from neuroblastoma_cnn.images.online_augmentation import dihedral_numpy
from neuroblastoma_cnn.images.preprocessing import Preprocessing, attach_preprocessing
from neuroblastoma_cnn.images.stain import fit_stain_reference, normalise_tiles
from neuroblastoma_cnn.pipelines.predict import nodes

CLASSES = ["a", "b"]


def corner_model() -> keras.Model:
    """Class a when the top-left quarter is red: orientation matters, so TTA differs."""
    inputs = keras.Input((32, 32, 3))
    corner = keras.layers.Lambda(lambda x: tf.reduce_mean(x[:, :16, :16, 0], axis=[1, 2]))(inputs)
    logits = keras.layers.Lambda(lambda c: tf.stack([c - 150.0, 150.0 - c], axis=1) / 20.0)(
        corner)
    return keras.Model(inputs, keras.layers.Softmax()(logits))


@pytest.fixture
def files(tmp_path: Path) -> list[tuple[str, Path]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(3):
        pixels = np.clip(rng.normal((110, 60, 140), 15, (64, 64, 3)), 0, 255).astype(np.uint8)
        pixels[:32, :32] = (230, 120, 60) if i != 1 else pixels[:32, :32]
        path = tmp_path / f"img{i}.png"
        Image.fromarray(pixels).save(path)
        out.append((path.name, path))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    out.append((bad.name, bad))
    return out


def model_with_record(stain_reference: dict | None = None) -> keras.Model:
    model = corner_model()
    record = Preprocessing.from_dict(store_metadata(CLASSES, 32)).model_copy(
        update={"architecture": "resnet34", "stain_reference": stain_reference})
    attach_preprocessing(model, record, "test model")
    return model


def test_tta_columns_beside_the_plain_prediction(files) -> None:
    model = model_with_record()
    plain, _ = nodes.predict_files(files, model, params("predict", tta=False, workers=1,
                                                        gradcam=False))
    tta, tiles = nodes.predict_files(files, model, params("predict", tta=True, workers=1,
                                                          gradcam=False))
    assert "tta_predicted" not in plain.columns
    assert plain.equals(tta[list(plain.columns)])  # the plain prediction is unchanged by TTA
    assert tta.loc[tta["rejected"], "tta_predicted"].tolist() == [""]
    ok = tta[~tta["rejected"]]
    assert ok["tta_confidence"].between(0.5, 1.0).all()
    assert tiles.loc[0, "tta_prob_a"] < tiles.loc[0, "prob_a"]  # 6 of 8 views lose the corner
    assert set(ok["tta_predicted"]) <= set(CLASSES)


def test_tta_probability_is_the_mean_over_the_symmetries() -> None:
    batcher = nodes._Batcher(corner_model(), batch_size=2, tta=True)
    tiles = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    batcher.add(tiles)
    plain, tta = batcher.finish(), batcher.finish_tta()
    model = corner_model()
    expected = np.mean([model.predict(dihedral_numpy(tiles, k).astype(np.float32), verbose=0)
                        for k in range(8)], axis=0)
    assert plain.shape == tta.shape == (3, 2)
    assert np.allclose(tta, expected, atol=1e-5)


def test_new_tiles_pass_through_the_models_stain_reference(files) -> None:
    sample = [np.asarray(Image.open(p).convert("RGB")) for _, p in files[:3]]
    reference = fit_stain_reference(sample, "reinhard")
    reference["mean"] = [reference["mean"][0] + 20, *reference["mean"][1:]]
    model = model_with_record(reference)
    _, tiles = nodes.predict_files(files[:1], model, params("predict", tta=False, workers=1,
                                                            gradcam=False))
    prepared = nodes.prepare_image(files[0][1], files[0][0], model.preprocessing, 1)
    raw = nodes.select_tiles(nodes.decode_for_prediction(files[0][1], files[0][0],
                                                         model.preprocessing),
                             model.preprocessing.tiling, 1)[0]
    assert np.array_equal(prepared.tiles, normalise_tiles(raw, reference))
    assert not np.array_equal(prepared.tiles, raw)
    expected = model.predict(prepared.tiles.astype(np.float32), verbose=0)[:, 0]
    assert np.allclose(tiles["prob_a"], expected, atol=1e-6)
