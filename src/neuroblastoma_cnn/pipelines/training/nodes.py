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

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from neuroblastoma_cnn.datasets.tile_store import TileStore
from neuroblastoma_cnn.images.preprocessing import Preprocessing
from neuroblastoma_cnn.params import ModelParams, TrainingParams
from neuroblastoma_cnn.runtime import distribution

from .fitting import (
    MONITOR_MODES,
    Setup,
    _precision,
    fit_stage,
    seed_everything,
    train_from_scratch,
    train_transfer,
)
from .inputs import (
    STAIN_FIT_TILES,
    TrainingData,
    _training_data,
    balanced_class_weights,
    fit_stain,
    keras_epochs,
    reshuffled_passes,
    training_stream,
)
from .optimizers import make_optimizer

#: The nodes, and the training pieces their tests and the study reach through this module (they
#: live in ``fitting``, ``inputs`` and ``optimizers``).
__all__ = [
    "DELIBERATE_STOPS", "HISTORY_METRICS", "MONITOR_MODES", "STAIN_FIT_TILES", "Setup",
    "TrainingData", "balanced_class_weights", "fit_stage", "fit_stain", "history_metrics",
    "keras_epochs", "make_optimizer", "plot_training_input", "reshuffled_passes", "run_key",
    "seed_everything", "train_from_scratch", "train_model", "train_transfer", "training_stream",
]

logger = logging.getLogger(__name__)

#: History columns logged to MLflow as per-epoch metrics.
HISTORY_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "val_macro_f1",
                   "val_image_macro_f1", "monitor_smoothed", "val_predicted_classes",
                   "learning_rate", "seconds")
#: Exceptions that end a run on purpose (a study pruning a trial): its backup is removed, since
#: nobody will resume it. Any other failure keeps the backup for a restart.
DELIBERATE_STOPS = ("TrialPruned",)


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
    from neuroblastoma_cnn.models.families import build_model  # noqa: PLC0415

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
    model = _build_model(build, model_params, p.seed, chosen.precision, strategy, input_size,
                         len(data.classes))
    history = _train_stages(model, data, model_params.transfer,
                            Setup(None if chosen.strategy == "one_device" else strategy,
                                  chosen.jit_compile, run))
    if chosen.strategy == "multi_worker":
        distribution.average_local_statistics(model, strategy)
    model = distribution.as_float32(model)
    model.preprocessing = Preprocessing.from_store(tiles).model_copy(
        update={"architecture": model_params.architecture,
                "stain_reference": data.stain_reference})
    if run is not None:
        distribution.clear_run(run)
    if chosen.workers > 1:  # the same digest on every worker: they agree on the weights
        logger.info("Worker %s of %d finished training: weights sha256 %s",
                    distribution.worker_index(), chosen.workers,
                    distribution.weights_digest(model))
    if not distribution.is_chief():
        logger.info("Worker %s of the cluster: the chief saves the model (same weights)",
                    distribution.worker_index())
    return model, pd.DataFrame(history)


def _build_model(build: Callable[..., Any], model_params: ModelParams, seed: int,
                 precision: str, strategy: Any, input_size: int, num_classes: int) -> Any:
    """The architecture, built in ``strategy``'s scope under ``precision``; its probabilities in
    float32 whatever the precision."""
    with strategy.scope(), _precision(precision):
        model = build(model_params.architecture, input_size=input_size,
                      num_classes=num_classes, seed=seed, **model_params.builder_kwargs())
    if precision != "float32":
        # Probabilities in float32: bfloat16 would round them to 3 digits, and MLflow's
        # signature and NumPy consumers expect a standard float type.
        model.layers[-1].dtype_policy = "float32"
    return model


def _train_stages(model: Any, data: TrainingData, transfer: bool, setup: Setup
                  ) -> list[dict[str, Any]]:
    """Trains ``model`` from scratch or by transfer; returns the history. A deliberate stop
    (:data:`DELIBERATE_STOPS`) removes the run's backup, since nobody will resume it."""
    train = train_transfer if transfer else train_from_scratch
    try:
        return train(model, data, setup)
    except Exception as exc:
        if setup.run is not None and type(exc).__name__ in DELIBERATE_STOPS:
            distribution.clear_run(setup.run)
        raise


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
