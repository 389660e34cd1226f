"""Evaluation with test-time augmentation beside the plain prediction, and tiles seen through
the model's stain reference."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from _params import params, store_metadata

from neuroblastoma_cnn.analysis.tta import tta_probabilities
from neuroblastoma_cnn.core.errors import ModelError
from neuroblastoma_cnn.datasets import write_tile_store
from neuroblastoma_cnn.images.preprocessing import Preprocessing
from neuroblastoma_cnn.images.stain import fit_stain_reference, normalise_tiles
from neuroblastoma_cnn.pipelines.evaluation import nodes

CLASSES = ["a", "b"]


def corner_model() -> keras.Model:
    """Sees orientation: class a when the top-left quarter is bright, so TTA changes it."""
    inputs = keras.Input((32, 32, 3))
    corner = keras.layers.Lambda(lambda x: tf.reduce_mean(x[:, :16, :16, 0], axis=[1, 2]))(inputs)
    logits = keras.layers.Lambda(lambda c: tf.stack([c - 128.0, 128.0 - c], axis=1) / 20.0)(
        corner)
    return keras.Model(inputs, keras.layers.Softmax()(logits))


@pytest.fixture
def setup(tmp_path: Path):
    rng = np.random.default_rng(0)

    def records():
        for i in range(12):
            tile = rng.integers(40, 90, (32, 32, 3)).astype(np.uint8)
            label = CLASSES[i % 2]
            if label == "a":
                tile[:16, :16] = 230 if i % 4 == 0 else tile[:16, :16]
                tile[16:, 16:] = 230 if i % 4 == 2 else tile[16:, 16:]
            yield tile, {"label": label, "group": f"g{i // 4}", "image_path": f"{label}{i // 4}"}

    store = write_tile_store(tmp_path / "tiles", records(), store_metadata(CLASSES, 32))
    split = store.index[["tile_id", "image_path", "label", "group"]].assign(split="test",
                                                                            fold=-1)
    model = corner_model()
    model.preprocessing = Preprocessing.from_store(store).model_copy(
        update={"architecture": "resnet34"})
    return model, store, split


def test_tta_columns_and_metrics_beside_the_plain_ones(setup):
    model, store, split = setup
    evaluation = params("evaluation", tta=True, bootstrap_samples=50)
    tiles = nodes.predict_split_tiles(model, store, split, evaluation)
    expected = tta_probabilities(model, tf.data.Dataset.from_tensor_slices(
        store.get(tiles["tile_id"].tolist()).astype(np.float32)).batch(4))
    assert np.allclose(tiles[["tta_prob_a", "tta_prob_b"]].to_numpy(), expected, atol=1e-6)
    assert not np.allclose(tiles["prob_a"], tiles["tta_prob_a"])  # the symmetries matter here
    images = nodes.aggregate_image_predictions(tiles)
    mean = tiles.groupby("image_path")["tta_prob_a"].mean()
    assert np.allclose(images.set_index("image_path")["tta_prob_a"], mean)
    assert set(images["tta_predicted"]) <= set(CLASSES)
    metrics, flat, *_ = nodes.compute_test_metrics(images, tiles, evaluation)
    assert 0 <= metrics["tta"]["f1_macro"] <= 1
    assert metrics["tta"]["macro_f1_ci"]["low"] <= metrics["tta"]["macro_f1_ci"]["high"]
    assert "test_tta.f1_macro" in flat and "test_f1_macro" in flat

    plain = nodes.predict_split_tiles(model, store, split, params("evaluation", tta=False))
    assert not nodes.tta_columns(plain)
    assert np.allclose(plain["prob_a"], tiles["prob_a"])
    metrics, *_ = nodes.compute_test_metrics(nodes.aggregate_image_predictions(plain), plain,
                                             params("evaluation", tta=False,
                                                    bootstrap_samples=50))
    assert "tta" not in metrics


def test_tiles_reach_the_model_through_its_stain_reference(setup):
    model, store, split = setup
    reference = fit_stain_reference(list(store.get(store.index["tile_id"].tolist())),
                                    "reinhard")
    reference["mean"] = [reference["mean"][0] + 30, *reference["mean"][1:]]  # a brighter lab
    model.preprocessing = model.preprocessing.model_copy(update={"stain_reference": reference})
    tiles = nodes.predict_split_tiles(model, store, split, params("evaluation", tta=False))
    ids = tiles["tile_id"].tolist()
    seen = normalise_tiles(store.get(ids), reference).astype(np.float32)
    assert np.allclose(tiles["prob_a"], model.predict(seen, verbose=0)[:, 0], atol=1e-6)
    raw = model.predict(store.get(ids).astype(np.float32), verbose=0)[:, 0]
    assert not np.allclose(tiles["prob_a"], raw)


def test_a_diverged_model_is_named_not_a_metric_traceback(setup):
    _, store, split = setup
    inputs = keras.Input((32, 32, 3))
    nan = keras.layers.Lambda(lambda x: tf.fill([tf.shape(x)[0], 2], float("nan")))(inputs)
    diverged = keras.Model(inputs, nan)
    diverged.preprocessing = setup[0].preprocessing
    evaluation = params("evaluation", tta=False, bootstrap_samples=50)
    tiles = nodes.predict_split_tiles(diverged, store, split, evaluation)  # studies fix these
    with pytest.raises(ModelError, match=r"NaN or infinite probabilities for 12 of 12 test "
                                         r"tiles: training diverged"):
        nodes.compute_test_metrics(nodes.aggregate_image_predictions(tiles), tiles, evaluation)
