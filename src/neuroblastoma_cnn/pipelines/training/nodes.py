"""Training: one node trains every architecture, from scratch or by transfer learning.

The same node trains ResNet34 from scratch and ResNet50 by transfer learning; the Kedro
pipeline is reused for both through namespaces, so nothing here knows which model it serves
except through its parameters. Keras' own ``EarlyStopping(restore_best_weights=True)`` keeps
the best epoch by ``monitor``; ``callbacks.ValidationReport`` adds the validation metrics it
needs (computed from one prediction pass per epoch) and writes the history, one log line per
epoch.

Keras (hence TensorFlow) is imported inside the functions that train: the pipelines import this
module when they are registered, and a run that trains nothing should not wait for TensorFlow.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pydantic import TypeAdapter

from neuroblastoma_cnn.datasets.tile_store import TileStore
from neuroblastoma_cnn.errors import DataError, ParameterError
from neuroblastoma_cnn.params import OPTIMIZERS, ModelParams, Schedule, TrainingParams
from neuroblastoma_cnn.preprocessing import Preprocessing
from neuroblastoma_cnn.tf_input import class_names, encode_labels, make_tf_dataset, split_tile_ids

logger = logging.getLogger(__name__)

#: Whether a larger value of each monitor is better.
MONITOR_MODES = {"val_macro_f1": "max", "val_loss": "min", "val_accuracy": "max"}
#: History columns logged to MLflow as per-epoch metrics.
HISTORY_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "val_macro_f1",
                   "val_predicted_classes", "learning_rate", "seconds")


# ----------------------------------------------------------------- training pieces


def make_optimizer(
    name: str, learning_rate: float, momentum: float = 0.9, schedule: Any = None,
    steps_per_epoch: int = 1, epochs: int = 1,
) -> Any:
    """Builds one of the study's optimizers, with an optional learning-rate schedule.

    ``schedule`` is a validated schedule model (or a dict with the same keys); ``plateau`` is
    applied by a callback in :func:`fit_stage`, not here.
    """
    import keras  # noqa: PLC0415  (lazy: see the module docstring)

    lr: Any = learning_rate
    if isinstance(schedule, dict):
        schedule = _as_schedule(schedule)
    kind = getattr(schedule, "type", None)
    if kind == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(learning_rate, max(1, steps_per_epoch * epochs))
    elif kind == "exponential":
        lr = keras.optimizers.schedules.ExponentialDecay(
            learning_rate, decay_steps=max(1, steps_per_epoch * schedule.decay_epochs),
            decay_rate=schedule.decay_rate, staircase=True,
        )
    factories = {
        "sgd": lambda: keras.optimizers.SGD(lr),
        "sgd_momentum": lambda: keras.optimizers.SGD(lr, momentum=momentum),
        "rmsprop": lambda: keras.optimizers.RMSprop(lr),
        "adagrad": lambda: keras.optimizers.Adagrad(lr),
        "adam": lambda: keras.optimizers.Adam(lr),
    }
    if name not in factories:
        raise ParameterError(f"Unknown optimizer '{name}': choose one of {', '.join(OPTIMIZERS)}.")
    return factories[name]()


def _as_schedule(raw: dict[str, Any]) -> Any:
    """A schedule dict checked as the parameters are (for direct calls and tests)."""
    try:
        return TypeAdapter(Schedule).validate_python(raw)
    except Exception as exc:
        raise ParameterError(f"Unknown schedule {raw!r}: use null, cosine, exponential or "
                             "plateau, each with its keys.") from exc


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Inverse-frequency weights (sklearn's 'balanced'); absent classes get weight 1."""
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    present = counts > 0
    weights = np.ones(num_classes)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return {i: float(w) for i, w in enumerate(weights)}


def _improves(value: float, reference: float | None, monitor: str) -> bool:
    if reference is None:
        return True
    return value > reference if MONITOR_MODES[monitor] == "max" else value < reference


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
    plateau: Any = None,
    baseline: float | None = None,
) -> float | None:
    """Compiles and fits one stage, keeping its best epoch by ``monitor``; returns the best
    monitored value kept.

    ``train`` is a tf.data.Dataset or an (x, y) tuple. With ``baseline`` (the previous stage's
    best), the stage's weights are kept only if an epoch beats it; otherwise the weights it
    started from are restored and ``baseline`` is returned.
    """
    import keras  # noqa: PLC0415  (lazy: see the module docstring)

    from .callbacks import ValidationReport  # noqa: PLC0415  (needs Keras)

    if monitor not in MONITOR_MODES:
        raise ParameterError(f"Unknown monitor '{monitor}': choose one of "
                             f"{', '.join(MONITOR_MODES)}.")
    mode = MONITOR_MODES[monitor]
    start_weights = model.get_weights() if baseline is not None else None
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    best = keras.callbacks.EarlyStopping(
        monitor=monitor, mode=mode, restore_best_weights=True,
        patience=patience if patience is not None else epochs + 1,
    )
    callbacks = [ValidationReport(val_inputs, val_labels, num_classes, stage, epochs, history),
                 best]
    if plateau is not None:
        callbacks.append(keras.callbacks.ReduceLROnPlateau(
            monitor=monitor, mode=mode, factor=plateau.factor, patience=plateau.patience))
    x, y = train if isinstance(train, tuple) else (train, None)
    model.fit(x, y, epochs=epochs, class_weight=class_weight, callbacks=callbacks, verbose=0,
              shuffle=False)
    if best.stopped_epoch:
        logger.info("%s: early stop, no %s gain in %d epochs", stage, monitor, patience)
    if start_weights is not None and not _improves(best.best, baseline, monitor):
        model.set_weights(start_weights)
        logger.info("%s: no epoch beat the previous stage's %s %.4f; kept its weights",
                    stage, monitor, baseline)
        return baseline
    logger.info("%s: kept epoch %d (%s %.4f)", stage, best.best_epoch + 1, monitor, best.best)
    return best.best


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seeds Python, NumPy and TensorFlow; deterministic ops make a CPU run repeatable."""
    import keras  # noqa: PLC0415  (lazy: see the module docstring)
    import tensorflow as tf  # noqa: PLC0415

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


# ---------------------------------------------------------------------- the node


@dataclass
class TrainingData:
    """The tiles a run trains and validates on, with labels encoded in the store's class order."""

    train_store: TileStore
    train_ids: list[int]
    y_train: np.ndarray
    val_ds: Any
    y_val: np.ndarray
    classes: list[str]
    params: TrainingParams

    def train_ds(self, batch_size: int, shuffle: bool) -> Any:
        """Made where it is used: an in-memory dataset holds its own copy of the tiles, and the
        feature cache needs an unshuffled pass that fine-tuning must not keep alive."""
        return make_tf_dataset(self.train_store, self.train_ids, self.y_train, batch_size,
                               shuffle=shuffle, seed=self.params.seed,
                               in_memory_limit_mb=self.params.in_memory_limit_mb)

    @property
    def steps_per_epoch(self) -> int:
        return int(np.ceil(len(self.train_ids) / self.params.batch_size))

    def fit_options(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        p = self.params
        plateau = p.schedule if getattr(p.schedule, "type", None) == "plateau" else None
        weights = (balanced_class_weights(self.y_train, len(self.classes))
                   if p.class_weights else None)
        return {"num_classes": len(self.classes), "monitor": p.monitor,
                "patience": p.early_stopping_patience, "class_weight": weights,
                "history": history, "plateau": plateau}

    def optimizer(self, learning_rate: float, epochs: int) -> Any:
        p = self.params
        return make_optimizer(p.optimizer, learning_rate, p.momentum, p.schedule,
                              self.steps_per_epoch, epochs)


def _training_data(augmented: TileStore, tiles: TileStore, split_table: pd.DataFrame,
                   params: TrainingParams) -> TrainingData:
    classes = class_names(tiles)
    train_index = augmented.index
    val_ids = split_tile_ids(split_table, "validation")
    if not val_ids:
        raise DataError("The split table has no validation tiles: cannot select the best epoch.",
                        hint="raise splitting.validation_fraction or add patients")
    y_val = encode_labels(tiles.rows(val_ids)["label"], classes)
    val_ds = make_tf_dataset(tiles, val_ids, y_val, params.batch_size,
                             in_memory_limit_mb=params.in_memory_limit_mb)
    return TrainingData(augmented, train_index["tile_id"].tolist(),
                        encode_labels(train_index["label"], classes), val_ds, y_val, classes,
                        params)


def train_from_scratch(model: Any, data: TrainingData) -> list[dict[str, Any]]:
    """One stage: the whole network, ``epochs`` epochs."""
    p = data.params
    history: list[dict[str, Any]] = []
    fit_stage(model, data.train_ds(p.batch_size, shuffle=True), data.val_ds, data.y_val,
              epochs=p.epochs, optimizer=data.optimizer(p.learning_rate, p.epochs),
              stage="train", **data.fit_options(history))
    return history


def train_transfer(model: Any, data: TrainingData) -> list[dict[str, Any]]:
    """Stage 1: the new head on backbone features computed once (the frozen backbone gives the
    same features every epoch). Stage 2: the top ``fine_tune_blocks`` residual blocks at
    ``fine_tune_learning_rate``, kept only if they beat stage 1's best."""
    from neuroblastoma_cnn.models.resnet50 import (  # noqa: PLC0415  (lazy: needs Keras)
        cache_features,
        set_trainable_top_blocks,
    )

    p = data.params
    history: list[dict[str, Any]] = []
    started = time.perf_counter()
    cached = cache_features(model, data.train_ds(64, shuffle=False), None, data.val_ds, None,
                            batch_size=p.batch_size, seed=p.seed)
    logger.info("Feature cache: %d + %d tiles through the frozen backbone in %.1fs",
                len(data.y_train), len(data.y_val), time.perf_counter() - started)
    best = fit_stage(cached.head, cached.train, cached.val_features, cached.val_labels,
                     epochs=p.epochs, optimizer=data.optimizer(p.learning_rate, p.epochs),
                     stage="head", **data.fit_options(history))
    if p.fine_tunes:
        set_trainable_top_blocks(model, p.fine_tune_blocks)
        fit_stage(model, data.train_ds(p.batch_size, shuffle=True), data.val_ds, data.y_val,
                  epochs=p.fine_tune_epochs,
                  optimizer=data.optimizer(p.fine_tune_learning_rate, p.fine_tune_epochs),
                  stage="fine_tune", baseline=best, **data.fit_options(history))
    return history


def train_model(
    augmented_train_tiles: TileStore,
    tiles: TileStore,
    split_table: pd.DataFrame,
    model_params: ModelParams,
    training_params: TrainingParams,
    build: Callable[..., Any] | None = None,
) -> tuple[Any, pd.DataFrame]:
    """Trains the configured architecture; returns the best-epoch model and its history.

    The model carries its preprocessing record: the tile store's (classes, image checks,
    tiling) plus the architecture. ``build`` replaces ``models.build_model`` (tests).
    """
    from neuroblastoma_cnn.models import build_model  # noqa: PLC0415  (lazy: needs Keras)

    build = build or build_model
    p = training_params
    seed_everything(p.seed, p.deterministic)
    data = _training_data(augmented_train_tiles, tiles, split_table, p)
    input_size = int(tiles.tile_shape[0])
    logger.info("Training %s on %d tiles (%d classes), validating on %d tiles",
                model_params.architecture, len(data.train_ids), len(data.classes),
                len(data.y_val))
    model = build(model_params.architecture, input_size=input_size,
                  num_classes=len(data.classes), seed=p.seed, **model_params.builder_kwargs())
    train = train_transfer if model_params.transfer else train_from_scratch
    history = train(model, data)
    model.preprocessing = Preprocessing.from_store(tiles).model_copy(
        update={"architecture": model_params.architecture})
    return model, pd.DataFrame(history)


def history_metrics(history: pd.DataFrame) -> dict[str, list[dict[str, float]]]:
    """Per-epoch history in the form MLflow's metric history takes: {name: [{value, step}]}."""
    out: dict[str, list[dict[str, float]]] = {}
    for column in HISTORY_METRICS:
        if column in history:
            out[column] = [
                {"value": float(v), "step": int(s)}
                for v, s in zip(history[column], history["epoch"], strict=True)
                if np.isfinite(v)
            ]
    return out
