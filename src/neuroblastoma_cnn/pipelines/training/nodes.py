"""Training nodes: tf.data input from the tile stores, one training loop for every architecture.

The same functions train ResNet34 from scratch and ResNet50 by transfer learning; the Kedro
pipeline is reused for both through namespaces, so nothing here knows which model it serves
except through its parameters.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from neuroblastoma_cnn.datasets.tile_store import TileStore

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "sgd_momentum", "rmsprop", "adagrad", "adam")
MONITORS = {"val_macro_f1": "max", "val_loss": "min", "val_accuracy": "max"}


# --------------------------------------------------------------------------- data


def class_names(store: TileStore) -> list[str]:
    """Class names in label order: the order stored with the tiles, taken from folder names."""
    classes = store.metadata.get("classes")
    if not classes:
        classes = sorted(store.index["label"].astype(str).unique())
    return [str(c) for c in classes]


def encode_labels(labels: pd.Series, classes: list[str]) -> np.ndarray:
    """Maps class names to integer labels; an unknown name is an error, never a silent -1."""
    lookup = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(labels.astype(str)) - set(lookup))
    if unknown:
        raise ValueError(f"Labels {unknown} are not among the known classes {classes}.")
    return labels.astype(str).map(lookup).to_numpy(dtype=np.int64)


def split_tile_ids(split_table: pd.DataFrame, split: str) -> list[int]:
    """Tile ids of one split, in table order."""
    ids = split_table.loc[split_table["split"] == split, "tile_id"]
    return [int(i) for i in ids]


def make_tf_dataset(
    store: TileStore,
    tile_ids: list[int],
    labels: np.ndarray | None,
    batch_size: int,
    shuffle: bool = False,
    seed: int | None = None,
    in_memory_limit_mb: float = 2048,
) -> Any:
    """A batched, prefetched ``tf.data.Dataset`` of (float32 images, int labels).

    When the subset fits under ``in_memory_limit_mb`` its tiles are read once into memory
    (the cache); otherwise batches are gathered from the memory-mapped shards in parallel
    map calls, so memory stays bounded by a few batches whatever the data size.
    """
    import tensorflow as tf

    n = len(tile_ids)
    y = np.zeros(n, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    tile_bytes = int(np.prod(store.tile_shape))
    if n * tile_bytes <= in_memory_limit_mb * 2**20:
        ds = tf.data.Dataset.from_tensor_slices((store.get(tile_ids), y))
        if shuffle:
            ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
        ds = ds.batch(batch_size).map(
            lambda x, t: (tf.cast(x, tf.float32), t), num_parallel_calls=tf.data.AUTOTUNE
        )
        return ds.prefetch(tf.data.AUTOTUNE)

    ids = np.asarray(tile_ids, dtype=np.int64)
    shape = store.tile_shape

    def gather(batch_ids: np.ndarray) -> np.ndarray:
        return store.get(batch_ids.tolist())

    def load(batch_ids: Any, batch_y: Any) -> tuple[Any, Any]:
        images = tf.numpy_function(gather, [batch_ids], tf.uint8)
        images.set_shape((None, *shape))
        return tf.cast(images, tf.float32), batch_y

    ds = tf.data.Dataset.from_tensor_slices((ids, y))
    if shuffle:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


# ----------------------------------------------------------------- training pieces


def make_optimizer(
    name: str, learning_rate: float, momentum: float = 0.9, schedule: dict | None = None,
    steps_per_epoch: int = 1, epochs: int = 1,
) -> Any:
    """Builds one of the study's optimizers, with an optional learning-rate schedule."""
    import keras

    lr: Any = learning_rate
    kind = (schedule or {}).get("type")
    if kind == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(learning_rate, max(1, steps_per_epoch * epochs))
    elif kind == "exponential":
        lr = keras.optimizers.schedules.ExponentialDecay(
            learning_rate,
            decay_steps=max(1, steps_per_epoch * int(schedule.get("decay_epochs", 10))),
            decay_rate=float(schedule.get("decay_rate", 0.5)),
            staircase=True,
        )
    elif kind not in (None, "plateau"):
        raise ValueError(f"Unknown schedule '{kind}': use null, cosine, exponential or plateau.")
    name = name.lower()
    if name == "sgd":
        return keras.optimizers.SGD(lr)
    if name == "sgd_momentum":
        return keras.optimizers.SGD(lr, momentum=momentum)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(lr)
    if name == "adagrad":
        return keras.optimizers.Adagrad(lr)
    if name == "adam":
        return keras.optimizers.Adam(lr)
    raise ValueError(f"Unknown optimizer '{name}': choose one of {', '.join(OPTIMIZERS)}.")


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Inverse-frequency weights (sklearn's 'balanced'); absent classes get weight 1."""
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    present = counts > 0
    weights = np.ones(num_classes)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return {i: float(w) for i, w in enumerate(weights)}


def _make_epoch_callback(
    val_inputs: Any,
    val_labels: np.ndarray,
    num_classes: int,
    monitor: str,
    patience: int | None,
    total_epochs: int,
    stage: str,
    history: list[dict[str, Any]],
    baseline: float | None = None,
) -> Any:
    import keras
    from sklearn.metrics import f1_score

    class EpochReport(keras.callbacks.Callback):
        """Validation metrics in one predict pass, best-epoch weights, early stop, one log line.

        Computing val loss, accuracy and macro-F1 from a single prediction avoids Keras'
        separate validation pass: the validation set is predicted once per epoch, not twice.
        """

        def __init__(self) -> None:
            super().__init__()
            self.best: float | None = baseline
            self.best_weights: list[np.ndarray] | None = None
            self.best_epoch = -1
            self.wait = 0
            self.started = 0.0

        def on_train_begin(self, logs: dict | None = None) -> None:
            # A later stage (fine-tuning) must beat the earlier stage's best to replace it.
            if baseline is not None:
                self.best_weights = self.model.get_weights()

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs if logs is not None else {}
            prob = np.asarray(self.model.predict(val_inputs, verbose=0), dtype=np.float64)
            pred = prob.argmax(axis=1)
            picked = np.clip(prob[np.arange(len(val_labels)), val_labels], 1e-7, 1.0)
            logs["val_loss"] = float(-np.log(picked).mean())
            logs["val_accuracy"] = float((pred == val_labels).mean())
            logs["val_macro_f1"] = float(
                f1_score(val_labels, pred, average="macro", labels=range(num_classes),
                         zero_division=0)
            )
            seconds = time.perf_counter() - self.started
            lr = self.model.optimizer.learning_rate
            row = {
                "epoch": len(history) + 1,
                "stage": stage,
                "loss": float(logs.get("loss", np.nan)),
                "accuracy": float(logs.get("accuracy", np.nan)),
                "val_loss": logs["val_loss"],
                "val_accuracy": logs["val_accuracy"],
                "val_macro_f1": logs["val_macro_f1"],
                "learning_rate": float(np.asarray(lr)),
                "seconds": seconds,
            }
            history.append(row)
            logger.info(
                "%s epoch %d/%d  loss %.4f  acc %.3f  val_loss %.4f  val_macro_f1 %.3f  %.1fs",
                stage, epoch + 1, total_epochs, row["loss"], row["accuracy"], row["val_loss"],
                row["val_macro_f1"], seconds,
            )
            value = logs[monitor]
            better = self.best is None or (
                value > self.best if MONITORS[monitor] == "max" else value < self.best
            )
            if better:
                self.best, self.best_epoch, self.wait = value, epoch, 0
                self.best_weights = self.model.get_weights()
            else:
                self.wait += 1
                if patience is not None and self.wait >= patience:
                    logger.info("%s: early stop, no %s gain in %d epochs", stage, monitor, patience)
                    self.model.stop_training = True

        def on_train_end(self, logs: dict | None = None) -> None:
            if self.best_weights is not None:
                self.model.set_weights(self.best_weights)
            if self.best_epoch >= 0:
                logger.info(
                    "%s: kept epoch %d (%s %.4f)", stage, self.best_epoch + 1, monitor, self.best
                )
            elif baseline is not None:
                logger.info("%s: no epoch beat the previous stage's %s %.4f; kept its weights",
                            stage, monitor, baseline)

    return EpochReport()


def fit_stage(
    model: Any,
    train: Any,
    val_inputs: Any,
    val_labels: np.ndarray,
    *,
    epochs: int,
    optimizer: Any,
    num_classes: int,
    monitor: str,
    patience: int | None,
    class_weight: dict[int, float] | None,
    stage: str,
    history: list[dict[str, Any]],
    plateau: dict | None = None,
    baseline: float | None = None,
) -> float | None:
    """Compiles and fits one stage; returns the best monitored value it kept.

    ``train`` is a tf.data.Dataset or an (x, y) tuple. With ``baseline`` (the previous stage's
    best), the stage's weights are kept only if an epoch beats it.
    """
    import keras

    if monitor not in MONITORS:
        raise ValueError(f"Unknown monitor '{monitor}': choose one of {sorted(MONITORS)}.")
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    report = _make_epoch_callback(val_inputs, val_labels, num_classes, monitor, patience, epochs,
                                  stage, history, baseline)
    callbacks = [report]
    if plateau:
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor=monitor, mode=MONITORS[monitor],
                factor=float(plateau.get("factor", 0.5)), patience=int(plateau.get("patience", 3)),
            )
        )
    x, y = train if isinstance(train, tuple) else (train, None)
    model.fit(x, y, epochs=epochs, class_weight=class_weight, callbacks=callbacks, verbose=0,
              shuffle=False)
    return report.best


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seeds Python, NumPy and TensorFlow; deterministic ops make a CPU run repeatable."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


# ---------------------------------------------------------------------- the node


def train_model(
    augmented_train_tiles: TileStore,
    tiles: TileStore,
    split_table: pd.DataFrame,
    model_params: dict[str, Any],
    training_params: dict[str, Any],
    build: Callable[..., Any] | None = None,
) -> tuple[Any, pd.DataFrame]:
    """Trains the configured architecture; returns the best-epoch model and its history.

    ResNet50 (``transfer: true``) runs two stages: the new head on cached backbone features,
    then fine-tuning of the top blocks at a lower learning rate with BatchNorm frozen.
    """
    from neuroblastoma_cnn.models import build_model

    build = build or build_model
    seed = int(training_params.get("seed", 42))
    seed_everything(seed, bool(training_params.get("deterministic", True)))

    classes = class_names(tiles)
    num_classes = len(classes)
    input_size = int(tiles.tile_shape[0])
    batch_size = int(training_params.get("batch_size", 16))
    limit_mb = float(training_params.get("in_memory_limit_mb", 2048))

    train_index = augmented_train_tiles.index
    y_train = encode_labels(train_index["label"], classes)
    val_ids = split_tile_ids(split_table, "validation")
    if not val_ids:
        raise ValueError("The split table has no validation tiles: cannot select the best epoch.")
    val_rows = tiles.rows(val_ids)
    y_val = encode_labels(val_rows["label"], classes)
    logger.info(
        "Training %s on %d tiles (%d classes), validating on %d tiles",
        model_params.get("architecture"), len(train_index), num_classes, len(val_ids),
    )

    train_ids = train_index["tile_id"].tolist()

    def train_data(batch: int, shuffle: bool) -> Any:
        """Made where it is used: an in-memory dataset holds its own copy of the tiles, and the
        feature cache needs an unshuffled pass that fine-tuning must not keep alive."""
        return make_tf_dataset(augmented_train_tiles, train_ids, y_train, batch, shuffle=shuffle,
                               seed=seed, in_memory_limit_mb=limit_mb)

    val_ds = make_tf_dataset(tiles, val_ids, y_val, batch_size, in_memory_limit_mb=limit_mb)
    class_weight = (
        balanced_class_weights(y_train, num_classes)
        if training_params.get("class_weights", False) else None
    )

    arch_params = {k: v for k, v in model_params.items() if k not in ("architecture", "transfer")}
    model = build(model_params["architecture"], input_size=input_size, num_classes=num_classes,
                  seed=seed, **arch_params)
    history: list[dict[str, Any]] = []
    monitor = training_params.get("monitor", "val_macro_f1")
    patience = training_params.get("early_stopping_patience")
    steps = int(np.ceil(len(train_index) / batch_size))
    epochs = int(training_params.get("epochs", 50))
    schedule = training_params.get("schedule")

    def optimizer(lr: float, n_epochs: int) -> Any:
        return make_optimizer(training_params.get("optimizer", "sgd"), lr,
                              float(training_params.get("momentum", 0.9)), schedule, steps,
                              n_epochs)

    plateau = schedule if (schedule or {}).get("type") == "plateau" else None
    common = {"num_classes": num_classes, "monitor": monitor, "patience": patience,
              "class_weight": class_weight, "history": history, "plateau": plateau}

    if model_params.get("transfer", False):
        from neuroblastoma_cnn.models.resnet50 import cache_features, set_trainable_top_blocks

        # Stage 1 feature cache: the frozen backbone sees every tile once, not once per epoch.
        started = time.perf_counter()
        cached = cache_features(model, train_data(64, shuffle=False), None, val_ds, None,
                                batch_size=batch_size, seed=seed)
        logger.info("Feature cache: %d + %d tiles through the frozen backbone in %.1fs",
                    len(y_train), len(y_val), time.perf_counter() - started)
        best = fit_stage(
            cached.head, cached.train, cached.val_features, cached.val_labels, epochs=epochs,
            optimizer=optimizer(float(training_params.get("learning_rate", 0.01)), epochs),
            stage="head", **common,
        )
        fine_blocks = int(training_params.get("fine_tune_blocks", 0))
        fine_epochs = int(training_params.get("fine_tune_epochs", 0))
        if fine_blocks > 0 and fine_epochs > 0:
            set_trainable_top_blocks(model, fine_blocks)
            fit_stage(model, train_data(batch_size, shuffle=True), val_ds, y_val,
                      epochs=fine_epochs,
                      optimizer=optimizer(float(training_params["fine_tune_learning_rate"]),
                                          fine_epochs),
                      stage="fine_tune", baseline=best, **common)
    else:
        fit_stage(model, train_data(batch_size, shuffle=True), val_ds, y_val, epochs=epochs,
                  optimizer=optimizer(float(training_params.get("learning_rate", 0.01)), epochs),
                  stage="train", **common)

    model.preprocessing = {
        **tiles.producer_metadata,
        "input_size": input_size,
        "classes": classes,
        "architecture": model_params["architecture"],
    }
    return model, pd.DataFrame(history)


def history_metrics(history: pd.DataFrame) -> dict[str, list[dict[str, float]]]:
    """Per-epoch history in the form MLflow's metric history takes: {name: [{value, step}]}."""
    out: dict[str, list[dict[str, float]]] = {}
    for column in ("loss", "accuracy", "val_loss", "val_accuracy", "val_macro_f1",
                   "learning_rate", "seconds"):
        if column in history:
            out[column] = [
                {"value": float(v), "step": int(s)}
                for v, s in zip(history[column], history["epoch"], strict=True)
                if np.isfinite(v)
            ]
    return out
