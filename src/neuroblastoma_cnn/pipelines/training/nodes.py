"""Training: one node trains every architecture, from scratch or by transfer learning.

The same node trains ResNet34 from scratch and ResNet50 by transfer learning; the Kedro
pipeline is reused for both through namespaces, so nothing here knows which model it serves
except through its parameters. Keras' own ``EarlyStopping(restore_best_weights=True)`` keeps
the best epoch by ``monitor``; ``callbacks.ValidationReport`` adds the validation metrics it
needs (computed from one prediction pass per epoch) and writes the history, one log line per
epoch.

Two ways to feed the training tiles. The study's: every tile once per epoch, reshuffled
(``sampling: shuffle`` with online augmentation off). The small-data recipe: an endless stream
drawn by ``sampling`` (``balanced``: every class equally often), each batch transformed afresh
by the online augmentation, ``steps_per_epoch`` batches an epoch. Stain normalisation, when set,
is fitted on the training tiles only and applied to every tile the model sees (training,
validation, and through the model's preprocessing record, evaluation and prediction).

Keras (hence TensorFlow) is imported inside the functions that train: the pipelines import this
module when they are registered, and a run that trains nothing should not wait for TensorFlow.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from pydantic import TypeAdapter

from neuroblastoma_cnn import sampling
from neuroblastoma_cnn.datasets.tile_store import TileStore
from neuroblastoma_cnn.errors import DataError, ParameterError
from neuroblastoma_cnn.online_augmentation import augment_batches, make_augmenter
from neuroblastoma_cnn.params import OPTIMIZERS, ModelParams, Schedule, TrainingParams
from neuroblastoma_cnn.preprocessing import Preprocessing
from neuroblastoma_cnn.stain import as_seen_by_model, fit_stain_reference
from neuroblastoma_cnn.tf_input import class_names, encode_labels, make_tf_dataset, split_tile_ids

logger = logging.getLogger(__name__)

#: Whether a larger value of each monitor is better.
MONITOR_MODES = {"val_macro_f1": "max", "val_image_macro_f1": "max", "val_loss": "min",
                 "val_accuracy": "max"}
#: History columns logged to MLflow as per-epoch metrics.
HISTORY_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "val_macro_f1",
                   "val_image_macro_f1", "monitor_smoothed", "val_predicted_classes",
                   "learning_rate", "seconds")
#: Training tiles sampled (evenly over the training split) to fit stain normalisation.
STAIN_FIT_TILES = 256


# ----------------------------------------------------------------- training pieces


def make_optimizer(
    name: str, learning_rate: float, momentum: float = 0.9, schedule: Any = None,
    steps_per_epoch: int = 1, epochs: int = 1, weight_decay: float = 0.0,
) -> Any:
    """Builds one of the study's optimizers (or AdamW), with an optional learning-rate schedule
    and decoupled weight decay.

    ``schedule`` is a validated schedule model (or a dict with the same keys); ``plateau`` is
    applied by a callback in :func:`fit_stage`, not here.
    """
    import keras  # noqa: PLC0415  (lazy: see the module docstring)

    lr: Any = learning_rate
    if isinstance(schedule, dict):
        schedule = _as_schedule(schedule)
    kind = getattr(schedule, "type", None)
    total = max(1, steps_per_epoch * epochs)
    if kind == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(learning_rate, total)
    elif kind == "warmup_cosine":
        warm = min(steps_per_epoch * schedule.warmup_epochs, total - 1)
        lr = (keras.optimizers.schedules.CosineDecay(
            0.0, total - warm, warmup_target=learning_rate, warmup_steps=warm)
            if warm > 0 else keras.optimizers.schedules.CosineDecay(learning_rate, total))
    elif kind == "exponential":
        lr = keras.optimizers.schedules.ExponentialDecay(
            learning_rate, decay_steps=max(1, steps_per_epoch * schedule.decay_epochs),
            decay_rate=schedule.decay_rate, staircase=True,
        )
    decay = float(weight_decay) or None
    factories = {
        "sgd": lambda: keras.optimizers.SGD(lr, weight_decay=decay),
        "sgd_momentum": lambda: keras.optimizers.SGD(lr, momentum=momentum, weight_decay=decay),
        "rmsprop": lambda: keras.optimizers.RMSprop(lr, weight_decay=decay),
        "adagrad": lambda: keras.optimizers.Adagrad(lr, weight_decay=decay),
        "adam": lambda: keras.optimizers.Adam(lr, weight_decay=decay),
        "adamw": lambda: keras.optimizers.AdamW(lr, weight_decay=float(weight_decay)),
    }
    if name not in factories:
        raise ParameterError(f"Unknown optimizer '{name}': choose one of {', '.join(OPTIMIZERS)}.")
    return factories[name]()


def _as_schedule(raw: dict[str, Any]) -> Any:
    """A schedule dict checked as the parameters are (for direct calls and tests)."""
    try:
        return TypeAdapter(Schedule).validate_python(raw)
    except Exception as exc:
        raise ParameterError(f"Unknown schedule {raw!r}: use null, cosine, warmup_cosine, "
                             "exponential or plateau, each with its keys.") from exc


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
    extra_callbacks: Sequence[Any] = (),
    steps_per_epoch: int | None = None,
    label_smoothing: float = 0.0,
    val_images: np.ndarray | None = None,
    monitor_window: int = 1,
) -> float | None:
    """Compiles and fits one stage, keeping its best epoch by ``monitor``; returns the best
    monitored value kept.

    ``train`` is a tf.data.Dataset or an (x, y) tuple; an endless dataset needs
    ``steps_per_epoch``. With ``baseline`` (the previous stage's best), the stage's weights are
    kept only if an epoch beats it; otherwise the weights it started from are restored and
    ``baseline`` is returned. ``extra_callbacks`` see each epoch's logs after the validation
    metrics are in them (studies report them for pruning). ``val_images`` (the image of each
    validation row) gives ``val_image_macro_f1``; ``monitor_window`` > 1 chooses the epoch on
    the mean of the monitor over that many epochs, which steadies a noisy validation score.
    """
    import keras  # noqa: PLC0415  (lazy: see the module docstring)

    from .callbacks import ValidationReport  # noqa: PLC0415  (needs Keras)

    if monitor not in MONITOR_MODES:
        raise ParameterError(f"Unknown monitor '{monitor}': choose one of "
                             f"{', '.join(MONITOR_MODES)}.")
    if monitor == "val_image_macro_f1" and val_images is None:
        raise ParameterError("monitor val_image_macro_f1 needs the validation tiles' images.")
    mode = MONITOR_MODES[monitor]
    watched = monitor if monitor_window <= 1 else "monitor_smoothed"
    start_weights = model.get_weights() if baseline is not None else None
    if label_smoothing > 0:
        # Keras' sparse loss has no smoothing: one-hot targets for the categorical one.
        loss: Any = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
        metrics: list[Any] = [keras.metrics.CategoricalAccuracy(name="accuracy")]
        train = _one_hot(train, num_classes)
    else:
        loss, metrics = "sparse_categorical_crossentropy", ["accuracy"]
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics)
    best = keras.callbacks.EarlyStopping(
        monitor=watched, mode=mode, restore_best_weights=True,
        patience=patience if patience is not None else epochs + 1,
    )
    report = ValidationReport(val_inputs, val_labels, num_classes, stage, epochs, history,
                              val_images=val_images, monitor=monitor, window=monitor_window)
    callbacks = [report, best]
    if plateau is not None:
        callbacks.append(keras.callbacks.ReduceLROnPlateau(
            monitor=watched, mode=mode, factor=plateau.factor, patience=plateau.patience))
    callbacks.extend(extra_callbacks)
    x, y = train if isinstance(train, tuple) else (train, None)
    model.fit(x, y, epochs=epochs, steps_per_epoch=steps_per_epoch, class_weight=class_weight,
              callbacks=callbacks, verbose=0, shuffle=False)
    if best.stopped_epoch:
        logger.info("%s: early stop, no %s gain in %d epochs", stage, watched, patience)
    if start_weights is not None and not _improves(best.best, baseline, monitor):
        model.set_weights(start_weights)
        logger.info("%s: no epoch beat the previous stage's %s %.4f; kept its weights",
                    stage, watched, baseline)
        return baseline
    logger.info("%s: kept epoch %d (%s %.4f)", stage, best.best_epoch + 1, watched, best.best)
    return best.best


def _one_hot(train: Any, num_classes: int) -> Any:
    if isinstance(train, tuple):
        x, y = train
        return x, np.eye(num_classes, dtype=np.float32)[np.asarray(y, dtype=int)]
    import tensorflow as tf  # noqa: PLC0415  (lazy: see the module docstring)

    return train.map(lambda x, y: (x, tf.one_hot(y, num_classes)),
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


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
    """The tiles a run trains and validates on, with labels encoded in the store's class order.

    ``train_store`` and the validation tiles are seen through the stain reference, if any.
    """

    train_store: Any
    train_ids: list[int]
    y_train: np.ndarray
    val_ds: Any
    y_val: np.ndarray
    val_images: np.ndarray
    classes: list[str]
    params: TrainingParams
    stain_reference: dict[str, Any] | None = None
    callbacks: Sequence[Any] = ()

    @property
    def endless(self) -> bool:
        """True for the recipe's endless stream; False for the study's one pass per epoch."""
        p = self.params
        return (p.sampling != "shuffle" or p.online_augmentation.enabled
                or p.steps_per_epoch is not None)

    def train_ds(self, batch_size: int, shuffle: bool) -> Any:
        """Made where it is used: an in-memory dataset holds its own copy of the tiles, and the
        feature cache needs an unshuffled pass that fine-tuning must not keep alive."""
        p = self.params
        if shuffle and self.endless:
            return training_stream(self.train_store, self.train_ids, self.y_train, batch_size, p)
        return make_tf_dataset(self.train_store, self.train_ids, self.y_train, batch_size,
                               shuffle=shuffle, seed=p.seed,
                               in_memory_limit_mb=p.in_memory_limit_mb)

    @property
    def steps_per_epoch(self) -> int:
        return sampling.steps_per_epoch(len(self.train_ids), self.params.batch_size,
                                        self.params.steps_per_epoch)

    def fit_options(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        p = self.params
        plateau = p.schedule if getattr(p.schedule, "type", None) == "plateau" else None
        weights = (balanced_class_weights(self.y_train, len(self.classes))
                   if p.class_weights else None)
        return {"num_classes": len(self.classes), "monitor": p.monitor,
                "patience": p.early_stopping_patience, "class_weight": weights,
                "history": history, "plateau": plateau, "extra_callbacks": self.callbacks,
                "label_smoothing": p.label_smoothing, "val_images": self.val_images,
                "monitor_window": p.monitor_window}

    def optimizer(self, learning_rate: float, epochs: int) -> Any:
        p = self.params
        return make_optimizer(p.optimizer, learning_rate, p.momentum, p.schedule,
                              self.steps_per_epoch, epochs, p.weight_decay)

    def fit_steps(self) -> int | None:
        """``steps_per_epoch`` for Keras: needed by the endless stream, None otherwise."""
        return self.steps_per_epoch if self.endless else None


def training_stream(store: Any, ids: list[int], labels: np.ndarray, batch_size: int,
                    params: TrainingParams) -> Any:
    """The recipe's training input: an endless stream of batches drawn by ``params.sampling``,
    transformed by the online augmentation, float32 in [0, 255]. In memory when the tiles fit
    under ``in_memory_limit_mb``, else gathered from the store batch by batch."""
    import tensorflow as tf  # noqa: PLC0415  (lazy: see the module docstring)

    tile_ids = np.asarray(ids, dtype=np.int64)
    fits = len(tile_ids) * int(np.prod(store.tile_shape)) <= params.in_memory_limit_mb * 2**20
    source: Any = (store.get(tile_ids.tolist()) if fits
                   else (lambda positions: store.get(tile_ids[positions].tolist())))
    batches = sampling.batched_training_data(
        source, labels, batch_size=batch_size, sampling=params.sampling, seed=params.seed,
        tile_shape=tuple(store.tile_shape))
    augmenter = make_augmenter(params.online_augmentation, params.seed)
    return augment_batches(batches, augmenter).prefetch(tf.data.AUTOTUNE)


def fit_stain(tiles: TileStore, split_table: pd.DataFrame, method: str | None,
              seed: int) -> dict[str, Any] | None:
    """The stain reference of the *training* split's original tiles (never validation or test:
    their colours must stay unseen), from at most ``STAIN_FIT_TILES`` spread over the split."""
    if method is None:
        return None
    ids = split_tile_ids(split_table, "train")
    if not ids:
        raise DataError("The split table has no training tiles to fit stain normalisation on.")
    picked = [ids[i] for i in np.linspace(0, len(ids) - 1, min(STAIN_FIT_TILES, len(ids)),
                                          dtype=int)]
    reference = fit_stain_reference(list(tiles.get(picked)), method, seed=seed)
    logger.info("Stain normalisation (%s) fitted on %d training tiles", method, len(picked))
    return reference


def _training_data(augmented: TileStore, tiles: TileStore, split_table: pd.DataFrame,
                   params: TrainingParams, callbacks: Sequence[Any] = ()) -> TrainingData:
    classes = class_names(tiles)
    train_index = augmented.index
    val_ids = split_tile_ids(split_table, "validation")
    if not val_ids:
        raise DataError("The split table has no validation tiles: cannot select the best epoch.",
                        hint="raise splitting.validation_fraction or add patients")
    reference = fit_stain(tiles, split_table, params.stain_normalisation, params.seed)
    val_rows = tiles.rows(val_ids)
    y_val = encode_labels(val_rows["label"], classes)
    val_ds = make_tf_dataset(as_seen_by_model(tiles, reference), val_ids, y_val,
                             params.batch_size, in_memory_limit_mb=params.in_memory_limit_mb)
    return TrainingData(as_seen_by_model(augmented, reference), train_index["tile_id"].tolist(),
                        encode_labels(train_index["label"], classes), val_ds, y_val,
                        val_rows["image_path"].astype(str).to_numpy(), classes, params,
                        reference, callbacks)


def train_from_scratch(model: Any, data: TrainingData) -> list[dict[str, Any]]:
    """One stage: the whole network, ``epochs`` epochs."""
    p = data.params
    history: list[dict[str, Any]] = []
    fit_stage(model, data.train_ds(p.batch_size, shuffle=True), data.val_ds, data.y_val,
              epochs=p.epochs, optimizer=data.optimizer(p.learning_rate, p.epochs),
              stage="train", steps_per_epoch=data.fit_steps(), **data.fit_options(history))
    return history


def train_transfer(model: Any, data: TrainingData) -> list[dict[str, Any]]:
    """Stage 1: the new head on backbone features computed once (the frozen backbone gives the
    same features every epoch, so no sampling or online augmentation here). Stage 2: the top
    ``fine_tune_blocks`` residual blocks at ``fine_tune_learning_rate``, on the training stream,
    kept only if they beat stage 1's best."""
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
                  stage="fine_tune", baseline=best, steps_per_epoch=data.fit_steps(),
                  **data.fit_options(history))
    return history


def train_model(
    augmented_train_tiles: TileStore,
    tiles: TileStore,
    split_table: pd.DataFrame,
    model_params: ModelParams,
    training_params: TrainingParams,
    build: Callable[..., Any] | None = None,
    callbacks: Sequence[Any] = (),
) -> tuple[Any, pd.DataFrame]:
    """Trains the configured architecture; returns the best-epoch model and its history.

    The model carries its preprocessing record: the tile store's (classes, image checks,
    tiling) plus the architecture. ``build`` replaces ``models.build_model`` (tests);
    ``callbacks`` are extra Keras callbacks for every stage (a study's pruning report).
    """
    from neuroblastoma_cnn.models import build_model  # noqa: PLC0415  (lazy: needs Keras)

    build = build or build_model
    p = training_params
    seed_everything(p.seed, p.deterministic)
    data = _training_data(augmented_train_tiles, tiles, split_table, p, callbacks)
    input_size = int(tiles.tile_shape[0])
    logger.info("Training %s on %d tiles (%d classes), validating on %d tiles",
                model_params.architecture, len(data.train_ids), len(data.classes),
                len(data.y_val))
    with _precision(p.precision):
        model = build(model_params.architecture, input_size=input_size,
                      num_classes=len(data.classes), seed=p.seed,
                      **model_params.builder_kwargs())
    if p.precision != "float32":
        # Probabilities in float32: bfloat16 would round them to 3 digits, and MLflow's
        # signature and NumPy consumers expect a standard float type.
        model.layers[-1].dtype_policy = "float32"
    train = train_transfer if model_params.transfer else train_from_scratch
    history = train(model, data)
    model.preprocessing = Preprocessing.from_store(tiles).model_copy(
        update={"architecture": model_params.architecture,
                "stain_reference": data.stain_reference})
    return model, pd.DataFrame(history)


@contextmanager
def _precision(policy: str) -> Iterator[None]:
    """Keras' global dtype policy while a model is built (layers keep the policy they were
    built with), restored afterwards so that later models in the process are unaffected."""
    import keras  # noqa: PLC0415  (lazy: see the module docstring)

    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def plot_training_input(augmented_train_tiles: TileStore, tiles: TileStore,
                        split_table: pd.DataFrame, training_params: TrainingParams) -> Figure:
    """The first training inputs exactly as the network receives them (same seed, sampling,
    stain normalisation and online augmentation as ``train_model``), with their classes: a
    check that the transforms still look like tissue."""
    p = training_params
    seed_everything(p.seed, p.deterministic)
    data = _training_data(augmented_train_tiles, tiles, split_table, p)
    images, labels = [], []
    for x, y in data.train_ds(p.batch_size, shuffle=True):
        images.extend(np.clip(np.asarray(x), 0, 255).astype(np.uint8))
        labels.extend(int(v) for v in np.asarray(y))
        if len(images) >= p.input_grid_samples:
            break
    n = min(p.input_grid_samples, len(images))
    cols = min(8, n)
    rows = int(np.ceil(n / cols))
    fig = Figure(figsize=(1.5 * cols, 1.6 * rows + 0.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, image, label in zip(axes, images[:n], labels[:n], strict=False):
        ax.imshow(image)
        ax.set_title(data.classes[label], fontsize=7)
    aug = p.online_augmentation
    fig.suptitle(
        f"What the network sees: first {n} training inputs (sampling {p.sampling}, online "
        f"augmentation {'on' if aug.enabled else 'off'}, stain normalisation "
        f"{p.stain_normalisation or 'off'})", fontsize=8)
    return fig


def history_metrics(history: pd.DataFrame) -> dict[str, list[dict[str, float]]]:
    """Per-epoch history in the form MLflow's metric history takes: {name: [{value, step}]}."""
    out: dict[str, list[dict[str, float]]] = {}
    for column in HISTORY_METRICS:
        if column not in history:
            continue
        points = [
            {"value": float(v), "step": int(s)}
            for v, s in zip(history[column], history["epoch"], strict=True)
            if np.isfinite(v)
        ]
        if points:  # kedro-mlflow refuses an empty history (e.g. a column never computed)
            out[column] = points
    return out
