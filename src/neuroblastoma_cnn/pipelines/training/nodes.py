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

Beyond one CPU (``distribution``, ``precision``, ``jit_compile``, ``scale_learning_rate``): the
model, optimiser and compiled step live in the chosen ``tf.distribute`` strategy's scope, and
the returned model is float32 whatever precision trained it (see ``distribution.py``).

Resume: every stage backs up to a run folder keyed by the run's parameters and data (see
``distribution.run_folder``); a restarted run continues after its last finished epoch. Its
training batches are a function of (seed, epoch) only: each input stream is built from the
epoch it starts at, skipping the cheap *positions* of earlier epochs (never their pixels), and
the online augmentation's batch counter starts at that epoch's first step; so a resumed run on
CPU ends with the weights of an uninterrupted one.

Keras (hence TensorFlow) is imported inside the functions that train: the pipelines import this
module when they are registered, and a run that trains nothing should not wait for TensorFlow.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from pydantic import TypeAdapter

from neuroblastoma_cnn.core.errors import DataError, ParameterError
from neuroblastoma_cnn.core.params import OPTIMIZERS, ModelParams, Schedule, TrainingParams
from neuroblastoma_cnn.core.preprocessing import Preprocessing
from neuroblastoma_cnn.datasets.tile_store import TileStore
from neuroblastoma_cnn.images import sampling
from neuroblastoma_cnn.images.online_augmentation import make_augmenter
from neuroblastoma_cnn.images.stain import as_seen_by_model, fit_stain_reference
from neuroblastoma_cnn.images.tf_input import (
    class_names,
    encode_labels,
    make_tf_dataset,
    split_tile_ids,
)
from neuroblastoma_cnn.runtime import distribution

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
#: Exceptions that end a run on purpose (a study pruning a trial): its backup is removed, since
#: nobody will resume it. Any other failure keeps the backup for a restart.
DELIBERATE_STOPS = ("TrialPruned",)


# ----------------------------------------------------------------- training pieces


def make_optimizer(
    name: str, learning_rate: float, momentum: float = 0.9, schedule: Any = None,
    steps_per_epoch: int = 1, epochs: int = 1, weight_decay: float = 0.0,
    ema_momentum: float | None = None,
) -> Any:
    """Builds one of the study's optimizers (or AdamW), with an optional learning-rate schedule,
    decoupled weight decay and a moving average of the weights (``ema_momentum``; see
    :func:`fit_stage` for how it is validated and kept).

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
    common: dict[str, Any] = {"weight_decay": float(weight_decay) or None}
    if ema_momentum is not None:
        common.update(use_ema=True, ema_momentum=float(ema_momentum))
    factories = {
        "sgd": lambda: keras.optimizers.SGD(lr, **common),
        "sgd_momentum": lambda: keras.optimizers.SGD(lr, momentum=momentum, **common),
        "rmsprop": lambda: keras.optimizers.RMSprop(lr, **common),
        "adagrad": lambda: keras.optimizers.Adagrad(lr, **common),
        "adam": lambda: keras.optimizers.Adam(lr, **common),
        "adamw": lambda: keras.optimizers.AdamW(
            lr, **{**common, "weight_decay": float(weight_decay)}),
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
    strategy: Any = None,
    jit_compile: bool | str = "auto",
    backup: Path | None = None,
) -> float | None:
    """Compiles and fits one stage, keeping its best epoch by ``monitor``; returns the best
    monitored value kept.

    ``train`` is a tf.data.Dataset, an (x, y) tuple, or a function ``first_epoch -> dataset``
    (the batches from that epoch on: what a resumed stage needs); an endless dataset needs
    ``steps_per_epoch``. ``strategy`` (None: TensorFlow's default) holds the model's
    variables; ``optimizer`` must have been made in its scope, where the stage compiles (with
    ``jit_compile``) and fits. With ``backup`` (a folder), every epoch is backed up
    there and a restarted stage resumes after its last finished epoch, with its history and
    best-epoch bookkeeping; a finished stage leaves only its result, which a restart reuses.
    With ``baseline`` (the previous stage's best), the stage's weights are
    kept only if an epoch beats it; otherwise the weights it started from are restored and
    ``baseline`` is returned. ``extra_callbacks`` see each epoch's logs after the validation
    metrics are in them (studies report them for pruning). ``val_images`` (the image of each
    validation row) gives ``val_image_macro_f1``; ``monitor_window`` > 1 chooses the epoch on
    the mean of the monitor over that many epochs, which steadies a noisy validation score.
    An optimizer with ``use_ema`` is validated, and its best epoch kept, with the moving
    average of the weights (:class:`~.callbacks.AveragedWeights`); it trains the raw ones.
    """
    import keras  # noqa: PLC0415  (lazy: see the module docstring)

    from .callbacks import AveragedWeights, ValidationReport  # noqa: PLC0415  (needs Keras)

    if monitor not in MONITOR_MODES:
        raise ParameterError(f"Unknown monitor '{monitor}': choose one of "
                             f"{', '.join(MONITOR_MODES)}.")
    if monitor == "val_image_macro_f1" and val_images is None:
        raise ParameterError("monitor val_image_macro_f1 needs the validation tiles' images.")
    finished = distribution.load_stage_result(backup)
    if finished is not None:
        return _finished_stage(model, history, finished, stage)
    mode = MONITOR_MODES[monitor]
    watched = monitor if monitor_window <= 1 else "monitor_smoothed"
    start_weights = model.get_weights() if baseline is not None else None
    first_row = len(history)
    epochs_folder = backup / "epochs" if backup is not None else None
    train, steps_per_epoch = _from_epoch(train, distribution.resumed_epoch(epochs_folder),
                                         steps_per_epoch)
    if strategy is not None:
        distribution.fix_keras_multi_worker(model, strategy)
    with _scope(strategy):
        if label_smoothing > 0:
            # Keras' sparse loss has no smoothing: one-hot targets for the categorical one.
            loss: Any = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
            metrics: list[Any] = [keras.metrics.CategoricalAccuracy(name="accuracy")]
            train = _one_hot(train, num_classes)
        else:
            loss, metrics = "sparse_categorical_crossentropy", ["accuracy"]
        model.compile(optimizer=optimizer, loss=loss, metrics=metrics, jit_compile=jit_compile)
    best = keras.callbacks.EarlyStopping(
        monitor=watched, mode=mode, restore_best_weights=True,
        patience=patience if patience is not None else epochs + 1,
    )
    report = ValidationReport(val_inputs, val_labels, num_classes, stage, epochs, history,
                              val_images=val_images, monitor=monitor, window=monitor_window)
    reduce = (keras.callbacks.ReduceLROnPlateau(monitor=watched, mode=mode,
                                                factor=plateau.factor, patience=plateau.patience)
              if plateau is not None else None)
    callbacks = [report, best, *([reduce] if reduce else []), *extra_callbacks]
    if _averages_weights(optimizer):
        averaged = AveragedWeights()
        callbacks = [averaged, *callbacks, averaged.swap_back]
    if epochs_folder is not None:
        callbacks.extend(_backup_callbacks(epochs_folder, history, first_row, report, best,
                                           reduce))
    x, y = train if isinstance(train, tuple) else (train, None)
    with _scope(strategy):
        model.fit(x, y, epochs=epochs, steps_per_epoch=steps_per_epoch,
                  class_weight=class_weight, callbacks=callbacks, verbose=0, shuffle=False)
    if best.stopped_epoch:
        logger.info("%s: early stop, no %s gain in %d epochs", stage, watched, patience)
    if start_weights is not None and not _improves(best.best, baseline, monitor):
        model.set_weights(start_weights)
        logger.info("%s: no epoch beat the previous stage's %s %.4f; kept its weights",
                    stage, watched, baseline)
        kept = baseline
    else:
        logger.info("%s: kept epoch %d (%s %.4f)", stage, best.best_epoch + 1, watched,
                    best.best)
        kept = best.best
    if backup is not None:
        distribution.save_stage_result(backup, model.get_weights(),
                                       distribution.rng_states(model),
                                       {"kept": kept, "history": history[first_row:]})
        distribution.clear_backup(epochs_folder)
    return kept


def _averages_weights(optimizer: Any) -> bool:
    """Whether ``optimizer`` (or the one a loss-scale wrapper holds) keeps a moving average."""
    return bool(getattr(getattr(optimizer, "inner_optimizer", optimizer), "use_ema", False))


def _scope(strategy: Any) -> Any:
    """``strategy``'s scope; none (TensorFlow's default strategy) for None."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def _finished_stage(model: Any, history: list[dict[str, Any]],
                    finished: tuple[list[np.ndarray], list[np.ndarray], dict[str, Any]],
                    stage: str) -> float | None:
    """A stage a killed run had finished: its weights, random states, history and result."""
    weights, rng, record = finished
    model.set_weights(weights)
    distribution.set_rng_states(model, rng)
    history.extend(record["history"])
    logger.info("%s: finished before the restart; its weights and %d epochs reused",
                stage, len(record["history"]))
    return record["kept"]


def _from_epoch(train: Any, first_epoch: int, steps: int | None) -> tuple[Any, int | None]:
    """The training input from ``first_epoch`` on, and the steps per epoch Keras needs.

    A function builds its stream from that epoch; a one-pass dataset (reshuffled at each
    iteration) becomes the endless stream of Keras' epochs (:func:`keras_epochs`: the shuffle
    seeds of successive iterations come from one seeded generator, so repetitions and
    re-iterations agree) with its first epochs skipped; arrays are the same every epoch."""
    if callable(train):
        return train(first_epoch), steps
    if isinstance(train, tuple) or first_epoch == 0:
        return train, steps
    if steps is not None:
        return train.skip(first_epoch * steps), steps
    batches = int(train.cardinality())
    if batches < 1:
        raise ParameterError("Resuming an endless training dataset needs steps_per_epoch.")
    return keras_epochs(train, batches).skip(first_epoch * batches), batches


def keras_epochs(one_pass: Any, batches: int) -> Any:
    """A one-pass dataset (``batches`` long) as an endless stream of the epochs Keras makes of
    it. Keras 3's ``EpochIterator`` iterates a dataset of known length afresh at each epoch
    start and once more at each epoch end (an iterator it drops), so a reshuffling dataset's
    epoch ``e`` is its iteration ``2e``; the dropped iteration is skipped here (not trained)
    so that a stream built from any epoch, resumed or not, has the batches Keras gave."""
    return one_pass.concatenate(one_pass.skip(batches)).repeat()


def _backup_callbacks(folder: Path, history: list[dict[str, Any]], first_row: int, report: Any,
                      best: Any, reduce: Any) -> list[Any]:
    """The epoch state Keras' ``BackupAndRestore`` leaves out (this stage's history rows from
    ``first_row``, the best epoch's value and weights, the plateau counters), then
    ``BackupAndRestore``."""

    def get_state() -> dict[str, Any]:
        return {"history": history[first_row:], "monitored": report.monitored,
                "best": best.best, "best_epoch": best.best_epoch, "wait": best.wait,
                "plateau": None if reduce is None else
                [reduce.best, reduce.wait, reduce.cooldown_counter]}

    def set_state(state: dict[str, Any]) -> None:
        history[first_row:] = state["history"]
        report.monitored[:] = state["monitored"]
        best.best, best.best_epoch, best.wait = state["best"], state["best_epoch"], state["wait"]
        if reduce is not None:
            reduce.best, reduce.wait, reduce.cooldown_counter = state["plateau"]

    def set_best_weights(weights: list[np.ndarray]) -> None:
        best.best_weights = weights

    return [distribution.epoch_state_callback(
                folder, get_state, set_state, lambda: (best.best_epoch, best.best_weights),
                set_best_weights),
            distribution.backup_callback(folder, delete_checkpoint=False)]


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
    ``replicas`` (of the distribution strategy) scales the learning rates when
    ``scale_learning_rate`` is on.
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
    replicas: int = 1

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

    def train_input(self, batch_size: int) -> Callable[[int], Any]:
        """``first_epoch -> dataset``: the shuffled training batches from that epoch on (the
        recipe's endless stream, or the study's reshuffled passes), for :func:`fit_stage`."""
        def from_epoch(first_epoch: int) -> Any:
            first_step = first_epoch * self.steps_per_epoch
            if self.endless:
                return training_stream(self.train_store, self.train_ids, self.y_train,
                                       batch_size, self.params, first_step=first_step)
            return reshuffled_passes(self.train_store, self.train_ids, self.y_train, batch_size,
                                     self.params, first_step=first_step)
        return from_epoch

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
        """Make it inside the strategy's scope (its variables belong there)."""
        p = self.params
        rate = distribution.scaled_learning_rate(learning_rate, self.replicas,
                                                 p.scale_learning_rate)
        return make_optimizer(p.optimizer, rate, p.momentum, p.schedule,
                              self.steps_per_epoch, epochs, p.weight_decay, p.ema_momentum)

    def fit_steps(self) -> int | None:
        """``steps_per_epoch`` for Keras: needed by the endless stream, None otherwise."""
        return self.steps_per_epoch if self.endless else None


def _gather_batches(positions: Any, store: Any, ids: list[int], labels: np.ndarray,
                    in_memory_limit_mb: float) -> Any:
    """Batches ``(float32 images, int64 labels)`` of the position batches ``positions``: from
    memory when the tiles fit under ``in_memory_limit_mb``, else read from the store batch by
    batch. Positions are drawn first and pixels gathered last, so skipping the epochs a
    resumed run has done costs no reading."""
    import tensorflow as tf  # noqa: PLC0415  (lazy: see the module docstring)

    tile_ids = np.asarray(ids, dtype=np.int64)
    y = tf.constant(np.asarray(labels, dtype=np.int64))
    shape = tuple(store.tile_shape)
    if len(tile_ids) * int(np.prod(shape)) <= in_memory_limit_mb * 2**20:
        images = tf.constant(np.asarray(store.get(tile_ids.tolist()), dtype=np.uint8))

        def load(at: Any) -> tuple[Any, Any]:
            return tf.cast(tf.gather(images, at), tf.float32), tf.gather(y, at)
    else:
        def read(at: np.ndarray) -> np.ndarray:
            return np.asarray(store.get(tile_ids[at].tolist()), dtype=np.uint8)

        def load(at: Any) -> tuple[Any, Any]:
            pixels = tf.numpy_function(read, [at], tf.uint8)
            pixels.set_shape((None, *shape))
            return tf.cast(pixels, tf.float32), tf.gather(y, at)
    return positions.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def training_stream(store: Any, ids: list[int], labels: np.ndarray, batch_size: int,
                    params: TrainingParams, first_step: int = 0) -> Any:
    """The recipe's training input: an endless stream of batches drawn by ``params.sampling``,
    transformed by the online augmentation, float32 in [0, 255]. In memory when the tiles fit
    under ``in_memory_limit_mb``, else gathered from the store batch by batch.

    ``first_step``: the stream starts at that batch (a resumed run's first epoch), with the
    positions and augmentation draws the uninterrupted stream has there."""
    import tensorflow as tf  # noqa: PLC0415  (lazy: see the module docstring)

    positions = sampling.index_stream(labels, params.sampling, params.seed).batch(batch_size)
    batches = _gather_batches(positions.skip(first_step), store, ids, labels,
                              params.in_memory_limit_mb)
    augmenter = make_augmenter(params.online_augmentation, params.seed)
    if augmenter.config.active:  # numbered as online_augmentation.augment_batches does
        batches = batches.enumerate(start=first_step).map(
            lambda step, batch: augmenter(batch[0], batch[1], step),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return batches.prefetch(tf.data.AUTOTUNE)


def reshuffled_passes(store: Any, ids: list[int], labels: np.ndarray, batch_size: int,
                      params: TrainingParams, first_step: int = 0) -> Any:
    """The study's training input: every tile once an epoch, reshuffled, without end; the
    batches Keras trained on when fed ``make_tf_dataset(shuffle=True)`` (see
    :func:`keras_epochs`), from batch ``first_step`` on."""
    import tensorflow as tf  # noqa: PLC0415  (lazy: see the module docstring)

    n = len(ids)
    one_pass = (tf.data.Dataset.from_tensor_slices(np.arange(n, dtype=np.int64))
                .shuffle(n, seed=params.seed, reshuffle_each_iteration=True).batch(batch_size))
    positions = keras_epochs(one_pass, -(-n // batch_size))
    return _gather_batches(positions.skip(first_step), store, ids, labels,
                           params.in_memory_limit_mb).prefetch(tf.data.AUTOTUNE)


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


@dataclass(frozen=True)
class Setup:
    """How the stages run: the strategy whose scope holds the model, optimisers and compiled
    steps (None: TensorFlow's default), XLA, and the run's backup folder (None: no backup)."""

    strategy: Any = None
    jit_compile: bool | str = "auto"
    run: Path | None = None

    def scope(self) -> Any:
        return _scope(self.strategy)

    def fit_kwargs(self, stage: str) -> dict[str, Any]:
        """:func:`fit_stage`'s strategy, XLA and backup folder (one per stage) arguments."""
        return {"strategy": self.strategy, "jit_compile": self.jit_compile,
                "backup": None if self.run is None else self.run / stage}


def train_from_scratch(model: Any, data: TrainingData, setup: Setup | None = None
                       ) -> list[dict[str, Any]]:
    """One stage: the whole network, ``epochs`` epochs."""
    setup = setup or Setup()
    p = data.params
    history: list[dict[str, Any]] = []
    with setup.scope():
        optimizer = data.optimizer(p.learning_rate, p.epochs)
    fit_stage(model, data.train_input(p.batch_size), data.val_ds, data.y_val,
              epochs=p.epochs, optimizer=optimizer, stage="train",
              steps_per_epoch=data.steps_per_epoch, **data.fit_options(history),
              **setup.fit_kwargs("train"))
    return history


def train_transfer(model: Any, data: TrainingData, setup: Setup | None = None
                   ) -> list[dict[str, Any]]:
    """Stage 1: the new head on backbone features computed once (the frozen backbone gives the
    same features every epoch, so no sampling or online augmentation here). Stage 2: the top
    ``fine_tune_blocks`` residual blocks at ``fine_tune_learning_rate``, on the training stream,
    kept only if they beat stage 1's best."""
    from neuroblastoma_cnn.models.resnet50 import (  # noqa: PLC0415  (lazy: needs Keras)
        cache_features,
        set_trainable_top_blocks,
    )

    setup = setup or Setup()
    p = data.params
    history: list[dict[str, Any]] = []
    started = time.perf_counter()
    cached = cache_features(model, data.train_ds(64, shuffle=False), None, data.val_ds, None,
                            batch_size=p.batch_size, seed=p.seed)
    logger.info("Feature cache: %d + %d tiles through the frozen backbone in %.1fs",
                len(data.y_train), len(data.y_val), time.perf_counter() - started)
    with setup.scope():
        optimizer = data.optimizer(p.learning_rate, p.epochs)
    best = fit_stage(cached.head, cached.train, cached.val_features, cached.val_labels,
                     epochs=p.epochs, optimizer=optimizer, stage="head",
                     **data.fit_options(history), **setup.fit_kwargs("head"))
    if p.fine_tunes:
        set_trainable_top_blocks(model, p.fine_tune_blocks)
        with setup.scope():
            optimizer = data.optimizer(p.fine_tune_learning_rate, p.fine_tune_epochs)
        fit_stage(model, data.train_input(p.batch_size), data.val_ds, data.y_val,
                  epochs=p.fine_tune_epochs, optimizer=optimizer, stage="fine_tune",
                  baseline=best, steps_per_epoch=data.steps_per_epoch,
                  **data.fit_options(history), **setup.fit_kwargs("fine_tune"))
    return history


def run_key(augmented: Any, tiles: Any, split_table: pd.DataFrame, model_params: ModelParams,
            training_params: TrainingParams) -> str:
    """What a run is: its parameters, its data (stores, training index, split table). A
    restart with all of them unchanged resumes; anything else starts afresh."""
    def digest(frame: pd.DataFrame) -> str:
        return distribution.fingerprint(
            pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())

    return distribution.fingerprint(
        model_params.model_dump(), training_params.model_dump(),
        str(getattr(augmented, "path", "")), str(getattr(tiles, "path", "")),
        tuple(tiles.tile_shape), digest(augmented.index), digest(split_table))


def train_model(
    augmented_train_tiles: TileStore,
    tiles: TileStore,
    split_table: pd.DataFrame,
    model_params: ModelParams,
    training_params: TrainingParams,
    build: Callable[..., Any] | None = None,
    callbacks: Sequence[Any] = (),
    backup: bool = True,
    backup_root: str | Path | None = None,
) -> tuple[Any, pd.DataFrame]:
    """Trains the configured architecture; returns the best-epoch model (float32) and its
    history.

    The model carries its preprocessing record: the tile store's (classes, image checks,
    tiling) plus the architecture. ``build`` replaces ``models.build_model`` (tests);
    ``callbacks`` are extra Keras callbacks for every stage (a study's pruning report).
    With ``backup``, the run backs up every epoch under ``backup_root`` (default: the
    project's ``data`` folder) and a restart with the same parameters and data resumes there;
    a finished run removes its backup. In a ``TF_CONFIG`` cluster every worker calls this and
    returns the same weights; only the chief's model should be saved (``distribution.is_chief``).
    """
    from neuroblastoma_cnn.models import build_model  # noqa: PLC0415  (lazy: needs Keras)

    build = build or build_model
    p = training_params
    chosen = distribution.current_plan(p.distribution, p.precision, p.jit_compile)
    strategy = distribution.make_strategy(chosen)  # first: a cluster forms before other TF ops
    seed_everything(p.seed, p.deterministic)
    data = _training_data(augmented_train_tiles, tiles, split_table, p, callbacks)
    data.replicas = int(strategy.num_replicas_in_sync)
    run = (distribution.run_folder(backup_root or distribution.default_backup_root(),
                                   model_params.architecture,
                                   run_key(augmented_train_tiles, tiles, split_table,
                                           model_params, p))
           if backup else None)
    input_size = int(tiles.tile_shape[0])
    logger.info("Training %s on %d tiles (%d classes), validating on %d tiles; %s, %d "
                "replica(s), %s, XLA %s", model_params.architecture, len(data.train_ids),
                len(data.classes), len(data.y_val), chosen.strategy, data.replicas,
                chosen.precision, "on" if chosen.jit_compile else "off")
    with strategy.scope(), _precision(chosen.precision):
        model = build(model_params.architecture, input_size=input_size,
                      num_classes=len(data.classes), seed=p.seed,
                      **model_params.builder_kwargs())
    if chosen.precision != "float32":
        # Probabilities in float32: bfloat16 would round them to 3 digits, and MLflow's
        # signature and NumPy consumers expect a standard float type.
        model.layers[-1].dtype_policy = "float32"
    train = train_transfer if model_params.transfer else train_from_scratch
    try:
        setup = Setup(None if chosen.strategy == "one_device" else strategy,
                      chosen.jit_compile, run)
        history = train(model, data, setup)
    except Exception as exc:
        if run is not None and type(exc).__name__ in DELIBERATE_STOPS:
            distribution.clear_run(run)
        raise
    model = distribution.as_float32(model)
    model.preprocessing = Preprocessing.from_store(tiles).model_copy(
        update={"architecture": model_params.architecture,
                "stain_reference": data.stain_reference})
    if run is not None:
        distribution.clear_run(run)
    if not distribution.is_chief():
        logger.info("Worker %s of the cluster: the chief saves the model (same weights)",
                    distribution.worker_index())
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
