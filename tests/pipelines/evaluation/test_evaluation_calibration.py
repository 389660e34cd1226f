"""The calibration nodes on a tiny store: T fitted on the validation images only, stored in the
record with ``temperature_scaling``, applied to the test predictions, ECE before/after in the
test metrics, reliability diagrams."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from _params import params, store_metadata
from matplotlib.figure import Figure

from neuroblastoma_cnn.analysis.calibration import apply_temperature
from neuroblastoma_cnn.core.errors import DataError
from neuroblastoma_cnn.datasets import write_tile_store
from neuroblastoma_cnn.images.preprocessing import Preprocessing
from neuroblastoma_cnn.pipelines.evaluation import nodes

CLASSES = ["a", "b"]


def brightness_model() -> keras.Model:
    """Over-confident: class a for bright tiles, with logits far too large for noisy labels."""
    inputs = keras.Input((16, 16, 3))
    mean = keras.layers.Lambda(lambda x: tf.reduce_mean(x, axis=[1, 2, 3]))(inputs)
    logits = keras.layers.Lambda(lambda m: tf.stack([m - 128.0, 128.0 - m], axis=1) / 4.0)(mean)
    return keras.Model(inputs, keras.layers.Softmax()(logits))


@pytest.fixture
def setup(tmp_path: Path):
    rng = np.random.default_rng(0)
    n = 80

    def records():
        for i in range(n):
            label = CLASSES[i % 2]
            bright = (label == "a") != (rng.random() < 0.25)  # a quarter of the labels "wrong"
            level = rng.integers(135, 160) if bright else rng.integers(96, 121)
            tile = np.full((16, 16, 3), level, dtype=np.uint8)
            yield tile, {"label": label, "group": f"g{i}", "image_path": f"img{i:03d}"}

    store = write_tile_store(tmp_path / "tiles", records(), store_metadata(CLASSES, 16))
    split = store.index[["tile_id", "image_path", "label", "group"]].assign(
        split=["validation" if i < n // 2 else "test" for i in range(n)], fold=-1)
    model = brightness_model()
    model.preprocessing = Preprocessing.from_store(store).model_copy(
        update={"architecture": "resnet34"})
    return model, store, split



@pytest.mark.parametrize("scaling", [False, True])
def test_temperature_from_validation_stored_only_when_asked(setup, scaling):
    model, store, split = setup
    evaluation = params("evaluation", temperature_scaling=scaling, bootstrap_samples=20)
    raw = nodes.predict_split_tiles(model, store, split, evaluation)
    model, calibration, figure = nodes.calibrate_model(model, store, split, evaluation)
    t = calibration["temperature"]
    assert t > 1.5  # over-confident: softened
    assert calibration["n_validation_images"] == 40 and calibration["applied"] is scaling
    assert calibration["validation_ece_after"] < calibration["validation_ece_before"]
    assert calibration["validation_nll_after"] < calibration["validation_nll_before"]
    assert isinstance(figure, Figure)
    assert model.preprocessing.temperature == (t if scaling else None)

    tiles = nodes.predict_split_tiles(model, store, split, evaluation)
    expected = apply_temperature(raw[["prob_a", "prob_b"]], t) if scaling else raw[
        ["prob_a", "prob_b"]].to_numpy()
    assert np.allclose(tiles[["prob_a", "prob_b"]], expected, atol=1e-6)
    images = nodes.aggregate_image_predictions(tiles)
    metrics, flat, *_ = nodes.compute_test_metrics(images, tiles, evaluation, calibration)
    block = metrics["calibration"]
    assert block["temperature"] == t and block["ece_after"] < block["ece_before"]
    # The same figures whether the model applied T itself or not.
    plain = nodes.calibration_metrics(raw, {**calibration, "applied": False})
    assert block["ece_before"] == pytest.approx(plain["ece_before"], abs=1e-6)
    assert block["ece_after"] == pytest.approx(plain["ece_after"], abs=1e-6)
    assert {"test_calibration.ece_before", "test_calibration.ece_after",
            "test_calibration.temperature", "test_calibration.validation_ece_after"} <= set(flat)
    assert isinstance(nodes.plot_test_reliability(tiles, calibration), Figure)


def test_scaling_without_validation_images_is_one_line(setup):
    model, store, split = setup
    split = split.assign(split="test")
    with pytest.raises(DataError, match="no validation images"):
        nodes.calibrate_model(model, store, split,
                              params("evaluation", temperature_scaling=True))
    model, calibration, _ = nodes.calibrate_model(model, store, split, params("evaluation"))
    assert calibration["temperature"] is None and calibration["applied"] is False
    assert calibration["prediction_sets"]["attached"] is False
    assert model.preprocessing.temperature is None and model.preprocessing.conformal is None
