"""Training nodes on synthetic tile stores, with a small stand-in network so each test is fast."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from _networks import small_cnn
from _params import params, store_metadata, study_params
from sklearn.metrics import f1_score

from neuroblastoma_cnn.datasets import write_tile_store
from neuroblastoma_cnn.images.tf_input import encode_labels, make_tf_dataset, split_tile_ids
from neuroblastoma_cnn.pipelines.training import nodes

CLASSES = ["alpha", "beta", "gamma"]


def _store(path: Path, n_per_class: int, seed: int, size: int = 16):
    """Tiles whose mean colour depends on the class, so a tiny model can learn them."""
    rng = np.random.default_rng(seed)

    def records():
        for c, name in enumerate(CLASSES):
            for i in range(n_per_class):
                tile = rng.normal(60 + 70 * c, 20, (size, size, 3)).clip(0, 255).astype(np.uint8)
                yield tile, {"label": name, "group": f"{name}-{i}", "image_path": f"{name}/{i}.png"}

    return write_tile_store(path, records(), store_metadata(CLASSES, size), 16)


@pytest.fixture
def stores(tmp_path: Path):
    train = _store(tmp_path / "train", 10, seed=1)
    tiles = _store(tmp_path / "tiles", 4, seed=2)
    split = tiles.index[["tile_id", "image_path", "label", "group"]].copy()
    split["split"] = ["validation", "validation", "test", "test"] * len(CLASSES)
    split["fold"] = -1
    return train, tiles, split


SETTINGS = {"optimizer": "adam", "learning_rate": 0.05, "epochs": 4, "batch_size": 8, "seed": 3}
TRAINING = study_params("resnet34.training", **SETTINGS)
MODEL = params("resnet34.model")  # built by small_cnn here


def test_optimizers_and_errors() -> None:
    assert isinstance(nodes.make_optimizer("sgd", 0.01), keras.optimizers.SGD)
    momentum = nodes.make_optimizer("sgd_momentum", 0.01, momentum=0.8)
    assert float(momentum.momentum) == pytest.approx(0.8)
    for name, cls in [("rmsprop", keras.optimizers.RMSprop), ("adagrad", keras.optimizers.Adagrad),
                      ("adam", keras.optimizers.Adam)]:
        assert isinstance(nodes.make_optimizer(name, 0.01), cls)
    cosine = nodes.make_optimizer("sgd", 0.1, schedule={"type": "cosine"}, steps_per_epoch=10,
                                  epochs=2)
    assert isinstance(cosine._learning_rate, keras.optimizers.schedules.CosineDecay)
    with pytest.raises(ValueError, match="Unknown optimizer 'nadam'"):
        nodes.make_optimizer("nadam", 0.01)
    with pytest.raises(ValueError, match="Unknown schedule"):
        nodes.make_optimizer("sgd", 0.01, schedule={"type": "triangle"})


def test_class_weights_and_labels() -> None:
    weights = nodes.balanced_class_weights(np.array([0, 0, 0, 1]), 3)
    assert weights[0] == pytest.approx(4 / 6) and weights[1] == pytest.approx(2.0)
    assert weights[2] == 1.0
    assert encode_labels(pd.Series(["b", "a"]), ["a", "b"]).tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"\['z'\] are not among"):
        encode_labels(pd.Series(["z"]), ["a", "b"])


def test_train_model_keeps_best_epoch_and_records_preprocessing(stores) -> None:
    train, tiles, split = stores
    model, history = nodes.train_model(train, tiles, split, MODEL,
                                       TRAINING, build=small_cnn)
    assert list(history["epoch"]) == [1, 2, 3, 4]
    assert {"loss", "accuracy", "val_loss", "val_macro_f1", "val_predicted_classes",
            "seconds"} <= set(history.columns)
    assert history["val_predicted_classes"].between(1, 3).all()
    assert list(model.preprocessing.classes) == CLASSES
    assert model.preprocessing.input_size == 16
    assert model.preprocessing.architecture == "resnet34"
    # The returned weights are those of the best validation epoch, not the last one.
    val_ids = split_tile_ids(split, "validation")
    pred = model.predict(tiles.get(val_ids).astype("float32"), verbose=0).argmax(1)
    y_val = encode_labels(tiles.rows(val_ids)["label"], CLASSES)
    achieved = f1_score(y_val, pred, average="macro", labels=range(3), zero_division=0)
    assert achieved == pytest.approx(history["val_macro_f1"].max())
    metrics = nodes.history_metrics(history)
    assert [p["step"] for p in metrics["val_macro_f1"]] == [1, 2, 3, 4]
    assert [p["value"] for p in metrics["val_predicted_classes"]] == list(
        history["val_predicted_classes"])


def test_training_is_repeatable_with_a_seed(stores) -> None:
    train, tiles, split = stores
    first, h1 = nodes.train_model(train, tiles, split, MODEL, TRAINING,
                                  build=small_cnn)
    second, h2 = nodes.train_model(train, tiles, split, MODEL, TRAINING,
                                   build=small_cnn)
    for a, b in zip(first.get_weights(), second.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    pd.testing.assert_series_equal(h1["loss"], h2["loss"])


def test_early_stopping_and_missing_validation(stores) -> None:
    train, tiles, split = stores
    stopping = study_params("resnet34.training", **{**SETTINGS, "epochs": 30,
                                                    "learning_rate": 1e-12,
                                                    "early_stopping_patience": 2,
                                                    "monitor": "val_loss"})
    _, history = nodes.train_model(train, tiles, split, MODEL, stopping, build=small_cnn)
    assert len(history) == 3  # lr ~0: nothing improves after epoch 1, stop after 2 more
    no_val = split.assign(split="test")
    with pytest.raises(ValueError, match="no validation tiles"):
        nodes.train_model(train, tiles, no_val, MODEL, TRAINING,
                          build=small_cnn)


def test_a_later_stage_must_beat_the_earlier_best(stores) -> None:
    """Fine-tuning keeps its weights only if it beats stage 1's best validation score."""
    train, tiles, split = stores
    model = small_cnn("small", 16, 3, seed=0)
    before = [w.copy() for w in model.get_weights()]
    val_ids = split_tile_ids(split, "validation")
    val_x = tiles.get(val_ids).astype("float32")
    val_y = encode_labels(tiles.rows(val_ids)["label"], CLASSES)
    data = make_tf_dataset(train, train.index["tile_id"].tolist(),
                           encode_labels(train.index["label"], CLASSES), 8,
                           in_memory_limit_mb=2048)
    history: list[dict] = []
    common = {"epochs": 2, "num_classes": 3, "monitor": "val_macro_f1", "patience": None,
              "class_weight": None, "stage": "fine_tune", "history": history}
    kept = nodes.fit_stage(model, data, val_x, val_y, optimizer=keras.optimizers.Adam(0.05),
                           baseline=1.01, **common)  # macro-F1 can never exceed 1
    assert kept == 1.01 and len(history) == 2
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    kept = nodes.fit_stage(model, data, val_x, val_y, optimizer=keras.optimizers.Adam(0.05),
                           baseline=-1.0, **common)
    assert kept == pytest.approx(max(row["val_macro_f1"] for row in history[2:]))
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))


def test_a_moving_average_of_the_weights_is_validated_and_kept_while_raw_ones_train(
        stores) -> None:
    """With ``ema_momentum`` the epochs are validated, and the best kept, on the average of the
    weights; training goes on from the raw weights (its losses match a run without it)."""
    train, tiles, split = stores
    sgd = nodes.make_optimizer("sgd", 0.01, ema_momentum=0.99)
    adamw = nodes.make_optimizer("adamw", 0.01, weight_decay=0.01, ema_momentum=0.5)
    assert (sgd.use_ema, adamw.use_ema) == (True, True)
    assert float(adamw.ema_momentum) == 0.5
    assert not nodes.make_optimizer("adam", 0.01).use_ema
    val_ids = split_tile_ids(split, "validation")
    val_x = tiles.get(val_ids).astype("float32")
    val_y = encode_labels(tiles.rows(val_ids)["label"], CLASSES)

    def run(ema: float | None) -> tuple[keras.Model, pd.DataFrame]:
        nodes.seed_everything(3, True)
        model = small_cnn("small", 16, 3, seed=0)
        data = make_tf_dataset(train, train.index["tile_id"].tolist(),
                               encode_labels(train.index["label"], CLASSES), 8,
                               in_memory_limit_mb=2048)
        history: list[dict] = []
        nodes.fit_stage(model, data, val_x, val_y, epochs=3, num_classes=3,
                        optimizer=nodes.make_optimizer("adam", 0.05, ema_momentum=ema),
                        monitor="val_loss", patience=None, class_weight=None, stage="train",
                        history=history)
        return model, pd.DataFrame(history)

    _, raw = run(None)
    model, averaged = run(0.5)
    np.testing.assert_array_equal(averaged["loss"], raw["loss"])  # the same training, exactly
    assert not np.allclose(averaged["val_loss"], raw["val_loss"])  # validated on the average
    kept = averaged.loc[averaged["val_loss"].idxmin()]
    prob = model.predict(val_x, verbose=0)
    loss = -np.log(np.clip(prob[np.arange(len(val_y)), val_y], 1e-7, 1)).mean()
    assert loss == pytest.approx(kept["val_loss"], rel=1e-5)  # the averaged epoch is kept


def test_history_metrics_leave_out_a_column_with_no_finite_value() -> None:
    """kedro-mlflow refuses an empty metric history, which used to stop the run after training."""
    history = pd.DataFrame({"epoch": [1, 2], "loss": [0.9, 0.7],
                            "val_macro_f1": [float("nan"), float("nan")]})
    metrics = nodes.history_metrics(history)
    assert "val_macro_f1" not in metrics
    assert [p["value"] for p in metrics["loss"]] == [0.9, 0.7]
