"""Fitting: the training stages (one ``fit_stage`` each) and how a run's stages are set up.

Kept apart from ``nodes.py`` so that the node reads as the run's outline (data, model, stages,
result) while the Keras mechanics of a stage (compile, callbacks, best epoch, backup) live here.
Keras (hence TensorFlow) is imported inside the functions, as in ``nodes.py``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neuroblastoma_cnn.core.errors import ParameterError
from neuroblastoma_cnn.runtime import distribution

from .inputs import TrainingData, _from_epoch, _one_hot

#: Logged under the node module's name, as before the split (log filters and readers see it).
logger = logging.getLogger("neuroblastoma_cnn.pipelines.training.nodes")


#: Whether a larger value of each monitor is better.
MONITOR_MODES = {"val_macro_f1": "max", "val_image_macro_f1": "max", "val_loss": "min",
                 "val_accuracy": "max"}


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
    On a cluster the workers first agree on that epoch (``distribution.agree_on_resume``).
    With ``baseline`` (the previous stage's best), the stage's weights are
    kept only if an epoch beats it; otherwise the weights it started from are restored and
    ``baseline`` is returned. ``extra_callbacks`` see each epoch's logs after the validation
    metrics are in them (studies report them for pruning). ``val_images`` (the image of each
    validation row) gives ``val_image_macro_f1``; ``monitor_window`` > 1 chooses the epoch on
    the mean of the monitor over that many epochs, which steadies a noisy validation score.
    An optimizer with ``use_ema`` is validated, and its best epoch kept, with the moving
    average of the weights (:class:`~.callbacks.AveragedWeights`); it trains the raw ones.
    """
    _check_monitor(monitor, val_images)
    if backup is not None and strategy is not None:
        distribution.agree_on_resume(backup, epochs, strategy)
    finished = distribution.load_stage_result(backup)
    if finished is not None:
        return _finished_stage(model, history, finished, stage)
    watched = monitor if monitor_window <= 1 else "monitor_smoothed"
    start_weights = model.get_weights() if baseline is not None else None
    first_row = len(history)
    epochs_folder = backup / "epochs" if backup is not None else None
    train, steps_per_epoch = _from_epoch(train, distribution.resumed_epoch(epochs_folder),
                                         steps_per_epoch)
    if strategy is not None:
        distribution.fix_keras_multi_worker(model, strategy)
    train = _compile(model, train, optimizer, num_classes, label_smoothing, strategy,
                     jit_compile)
    callbacks, best = _stage_callbacks(
        val_inputs, val_labels, num_classes=num_classes, stage=stage, epochs=epochs,
        history=history, val_images=val_images, monitor=monitor, monitor_window=monitor_window,
        patience=patience, plateau=plateau, optimizer=optimizer,
        extra_callbacks=extra_callbacks, epochs_folder=epochs_folder, first_row=first_row,
        cluster=strategy is not None and distribution.multi_worker(strategy))
    x, y = train if isinstance(train, tuple) else (train, None)
    with _scope(strategy):
        model.fit(x, y, epochs=epochs, steps_per_epoch=steps_per_epoch,
                  class_weight=class_weight, callbacks=callbacks, verbose=0, shuffle=False)
    if best.stopped_epoch:
        logger.info("%s: early stop, no %s gain in %d epochs", stage, watched, patience)
    kept = _keep_best(model, best, start_weights, baseline, monitor, watched, stage)
    if backup is not None:
        distribution.save_stage_result(backup, model.get_weights(),
                                       distribution.rng_states(model),
                                       {"kept": kept, "history": history[first_row:]})
        distribution.clear_backup(epochs_folder)
    return kept


def _check_monitor(monitor: str, val_images: np.ndarray | None) -> None:
    if monitor not in MONITOR_MODES:
        raise ParameterError(f"Unknown monitor '{monitor}': choose one of "
                             f"{', '.join(MONITOR_MODES)}.")
    if monitor == "val_image_macro_f1" and val_images is None:
        raise ParameterError("monitor val_image_macro_f1 needs the validation tiles' images.")


def _compile(model: Any, train: Any, optimizer: Any, num_classes: int, label_smoothing: float,
             strategy: Any, jit_compile: bool | str) -> Any:
    """Compiles ``model`` in ``strategy``'s scope; returns ``train`` with one-hot targets when
    the loss smooths labels (Keras' sparse loss has no smoothing), else unchanged."""
    import keras  # noqa: PLC0415  (lazy: see the module docstring)

    with _scope(strategy):
        if label_smoothing > 0:
            # Keras' sparse loss has no smoothing: one-hot targets for the categorical one.
            loss: Any = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
            metrics: list[Any] = [keras.metrics.CategoricalAccuracy(name="accuracy")]
            train = _one_hot(train, num_classes)
        else:
            loss, metrics = "sparse_categorical_crossentropy", ["accuracy"]
        model.compile(optimizer=optimizer, loss=loss, metrics=metrics, jit_compile=jit_compile)
    return train


def _stage_callbacks(
    val_inputs: Any, val_labels: np.ndarray, *, num_classes: int, stage: str, epochs: int,
    history: list[dict[str, Any]], val_images: np.ndarray | None, monitor: str,
    monitor_window: int, patience: int | None, plateau: Any, optimizer: Any,
    extra_callbacks: Sequence[Any], epochs_folder: Path | None, first_row: int,
    cluster: bool = False,
) -> tuple[list[Any], Any]:
    """A stage's callbacks, in the order they must see each epoch (validation metrics first,
    then the best epoch, the plateau, the caller's, the backup), and the ``EarlyStopping`` that
    keeps the best epoch."""
    import keras  # noqa: PLC0415  (lazy: see the module docstring)

    from .callbacks import AveragedWeights, ValidationReport  # noqa: PLC0415  (needs Keras)

    mode = MONITOR_MODES[monitor]
    watched = monitor if monitor_window <= 1 else "monitor_smoothed"
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
                                           reduce, cluster))
    return callbacks, best


def _keep_best(model: Any, best: Any, start_weights: list[np.ndarray] | None,
               baseline: float | None, monitor: str, watched: str, stage: str) -> float | None:
    """The stage's result: its best epoch (restored by ``best``), unless it started from a
    previous stage's weights (``start_weights``) and no epoch beat that stage's ``baseline``;
    then those weights are restored and ``baseline`` kept."""
    if start_weights is not None and not _improves(best.best, baseline, monitor):
        model.set_weights(start_weights)
        logger.info("%s: no epoch beat the previous stage's %s %.4f; kept its weights",
                    stage, watched, baseline)
        return baseline
    logger.info("%s: kept epoch %d (%s %.4f)", stage, best.best_epoch + 1, watched, best.best)
    return best.best


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


def _backup_callbacks(folder: Path, history: list[dict[str, Any]], first_row: int, report: Any,
                      best: Any, reduce: Any, cluster: bool = False) -> list[Any]:
    """The epoch state Keras' ``BackupAndRestore`` leaves out (this stage's history rows from
    ``first_row``, the best epoch's value and weights, the plateau counters), then
    ``BackupAndRestore`` (on a cluster keeping the previous epoch's checkpoint too, see
    ``distribution.agree_on_resume``)."""

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
            distribution.backup_callback(folder, delete_checkpoint=False,
                                         keep_previous=cluster)]


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seeds Python, NumPy and TensorFlow; deterministic ops make a CPU run repeatable."""
    import keras  # noqa: PLC0415  (lazy: see the module docstring)
    import tensorflow as tf  # noqa: PLC0415

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


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
