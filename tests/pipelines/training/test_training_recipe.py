"""The small-data recipe in the training node: AdamW / weight decay, warm-up + cosine, label
smoothing, balanced endless sampling with online augmentation, stain normalisation fitted on
training tiles only, per-image validation macro-F1 with a smoothing window, the input grid."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from _networks import small_cnn
from _params import params, store_metadata, study_params
from matplotlib.figure import Figure

from neuroblastoma_cnn.datasets import write_tile_store
from neuroblastoma_cnn.pipelines.training import nodes
from neuroblastoma_cnn.pipelines.training.callbacks import ValidationReport

CLASSES = ["alpha", "beta", "gamma"]
RECIPE = {
    "optimizer": "adamw", "learning_rate": 0.01, "weight_decay": 0.01, "epochs": 3,
    "batch_size": 8, "seed": 5, "steps_per_epoch": 3, "sampling": "balanced",
    "schedule": {"type": "warmup_cosine", "warmup_epochs": 1}, "label_smoothing": 0.1,
    "stain_normalisation": "reinhard", "monitor": "val_image_macro_f1", "monitor_window": 2,
    "input_grid_samples": 10,
    "online_augmentation": {**params("resnet34.training").online_augmentation.model_dump(),
                            "enabled": True},
}


def _records(n_per_class: dict[str, int], seed: int, size: int = 16):
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        for i in range(n_per_class[name]):
            base = np.array([200 - 40 * c, 120, 160 + 20 * c])  # pink -> purple by class
            tile = rng.normal(base, 20, (size, size, 3)).clip(0, 255).astype(np.uint8)
            yield tile, {"label": name, "group": f"{name}-{i // 2}",
                         "image_path": f"{name}/{i // 2}.png"}


@pytest.fixture
def stores(tmp_path: Path):
    """A tile store with train / validation / test rows (two tiles an image) and an imbalanced
    training store (what augmentation would hand over)."""
    meta = store_metadata(CLASSES, 16)
    tiles = write_tile_store(tmp_path / "tiles", _records(dict.fromkeys(CLASSES, 12), 1), meta)
    split = tiles.index[["tile_id", "image_path", "label", "group"]].copy()
    position = split.groupby("label").cumcount()
    split["split"] = np.select([position < 8, position < 10], ["train", "validation"], "test")
    split["fold"] = -1
    train = write_tile_store(tmp_path / "train",
                             _records({"alpha": 24, "beta": 6, "gamma": 3}, 2), meta)
    return train, tiles, split


def test_adamw_weight_decay_and_warmup_cosine_schedule() -> None:
    adamw = nodes.make_optimizer("adamw", 0.01, weight_decay=0.05)
    assert isinstance(adamw, keras.optimizers.AdamW) and adamw.weight_decay == pytest.approx(0.05)
    sgd = nodes.make_optimizer("sgd_momentum", 0.01, weight_decay=1e-4)
    assert sgd.weight_decay == pytest.approx(1e-4)
    assert nodes.make_optimizer("sgd", 0.01).weight_decay is None  # the study: no decay
    opt = nodes.make_optimizer("sgd", 0.1, schedule={"type": "warmup_cosine", "warmup_epochs": 2},
                               steps_per_epoch=10, epochs=10)
    lr = opt._learning_rate
    assert float(lr(0)) == pytest.approx(0.0)
    assert float(lr(10)) == pytest.approx(0.05)  # half-way up the warm-up
    assert float(lr(20)) == pytest.approx(0.1)  # top, then cosine down to 0 at the end
    assert float(lr(60)) == pytest.approx(0.05, abs=1e-6)
    assert float(lr(100)) == pytest.approx(0.0, abs=1e-6)


def test_image_macro_f1_averages_tile_probabilities_per_image() -> None:
    report = ValidationReport(np.zeros((4, 1)), np.array([0, 0, 1, 1]), 2, "s", 1, [],
                              val_images=np.array(["a", "a", "b", "b"]))
    # image a: tiles lean 0.9 / 0.3 towards class 0 -> mean 0.6 -> class 0 (right);
    # image b: 0.2 / 0.7 towards class 0 -> mean 0.45 -> class 1 (right) although tile 4 is wrong
    prob = np.array([[0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [0.7, 0.3]])
    assert report._image_macro_f1(prob) == pytest.approx(1.0)
    assert report._image_macro_f1(prob[:, ::-1]) == pytest.approx(0.0)


def test_recipe_trains_balanced_augmented_and_stain_normalised(stores) -> None:
    train, tiles, split = stores
    training = params("resnet34.training", **RECIPE)
    model, history = nodes.train_model(train, tiles, split, params("resnet34.model"), training,
                                       build=small_cnn)
    assert list(history["epoch"]) == [1, 2, 3]
    assert history["val_image_macro_f1"].between(0, 1).all()
    smoothed = history["monitor_smoothed"].to_numpy()
    raw = history["val_image_macro_f1"].to_numpy()
    assert smoothed[1] == pytest.approx(raw[:2].mean())
    assert smoothed[2] == pytest.approx(raw[1:3].mean())
    reference = model.preprocessing.stain_reference
    assert reference["method"] == "reinhard"
    assert reference["n_images"] == 24  # the 8 training tiles of each class in `tiles`, only
    # the same seed repeats the run exactly
    _, history2 = nodes.train_model(train, tiles, split, params("resnet34.model"), training,
                                        build=small_cnn)
    pd.testing.assert_series_equal(history["loss"], history2["loss"])


def test_endless_stream_balances_classes_and_study_path_stays_one_pass(stores) -> None:
    train, tiles, split = stores
    recipe = params("resnet34.training", **RECIPE)
    data = nodes._training_data(train, tiles, split, recipe)
    assert data.endless and data.steps_per_epoch == 3
    labels = np.concatenate([y.numpy() for _, y in data.train_ds(8, shuffle=True).take(60)])
    assert np.allclose(np.bincount(labels, minlength=3) / len(labels), 1 / 3, atol=0.06)

    study = study_params("resnet34.training", batch_size=8)
    data = nodes._training_data(train, tiles, split, study)
    assert not data.endless and data.fit_steps() is None
    labels = np.concatenate([y.numpy() for _, y in data.train_ds(8, shuffle=True)])
    assert np.bincount(labels).tolist() == [24, 6, 3]  # every training tile once


def test_input_grid_shows_the_first_training_inputs(stores) -> None:
    train, tiles, split = stores
    training = params("resnet34.training", **RECIPE)
    figure = nodes.plot_training_input(train, tiles, split, training)
    assert isinstance(figure, Figure)
    shown = [ax for ax in figure.axes if ax.images]
    assert len(shown) == 10
    data = nodes._training_data(train, tiles, split, training)
    first = next(iter(data.train_ds(8, shuffle=True)))[0].numpy()
    assert np.array_equal(shown[0].images[0].get_array(),
                          np.clip(first[0], 0, 255).astype(np.uint8))
    assert shown[0].get_title() in CLASSES


def test_mixed_bfloat16_computes_in_bf16_and_saves_float32_and_restores_policy(stores) -> None:
    """Training computes in bfloat16; the returned (saved) model is float32 throughout."""
    train, tiles, split = stores
    training = params("resnet34.training", **{**RECIPE, "precision": "mixed_bfloat16",
                                              "epochs": 1})
    seen: list[tuple[str, str]] = []

    class Dtypes(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            conv = next(layer for layer in self.model.layers
                        if isinstance(layer, keras.layers.Conv2D))
            seen.append((conv.dtype_policy.compute_dtype, conv.dtype_policy.variable_dtype))

    model, _ = nodes.train_model(train, tiles, split, params("resnet34.model"), training,
                                 build=small_cnn, callbacks=[Dtypes()])
    assert seen == [("bfloat16", "float32")]
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
    assert model.preprocessing.architecture == "resnet34"
    out = model.predict(tiles.get([0, 1]).astype(np.float32), verbose=0)
    assert out.dtype == np.float32 and np.allclose(out.sum(axis=1), 1.0, atol=1e-5)
    assert keras.mixed_precision.global_policy().name == "float32"
