"""One trial with the project's own code: train on a repeat, evaluate on the test split, log.

The training and evaluation functions are the nodes of the ``training`` and ``evaluation``
pipelines, handed in by ``pipeline_registry`` as :class:`ProjectSteps` (pipelines never import
each other), so a trial trains and scores a model exactly as ``kedro run --pipeline=resnet34``
does, on the data stages' own outputs: the repeat only changes which patients validate (see
``repeats.py``), the training seed (``training.seed + repeat``) and the variant's parameters.
The trained model itself is not kept (a study trains dozens); its history, test metrics,
confusion matrix and classification report go to the trial's MLflow child run.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neuroblastoma_cnn.analysis import metrics as m
from neuroblastoma_cnn.analysis.predictions import PROB_PREFIX
from neuroblastoma_cnn.datasets.tile_store import TileStore
from neuroblastoma_cnn.params import EvaluationParams, ModelParams, TrainingParams

from .engine import TrialContext, TrialOutcome, TrialSpec
from .repeats import repeat_split_table, training_tile_ids

logger = logging.getLogger(__name__)

HISTORY_COLUMNS = ("loss", "accuracy", "val_loss", "val_accuracy", "val_macro_f1",
                   "learning_rate", "seconds")


@dataclass(frozen=True)
class ProjectSteps:
    """The project's node functions a trial runs, in order (module-level functions: they
    pickle by name into spawned workers)."""

    train: Callable[..., tuple[Any, pd.DataFrame]]  # training.nodes.train_model
    predict: Callable[..., pd.DataFrame]            # evaluation.nodes.predict_split_tiles
    aggregate: Callable[..., pd.DataFrame]          # evaluation.nodes.aggregate_image_predictions
    evaluate: Callable[..., tuple]                  # evaluation.nodes.compute_test_metrics


def subset_store(store: TileStore, tile_ids: list[int]) -> TileStore:
    """A view of ``store`` holding only ``tile_ids`` (same shards on disk, nothing copied)."""
    view = copy.copy(store)
    view.index = store.index[store.index["tile_id"].isin(tile_ids)].reset_index(drop=True)
    return view


def parse_trial_params(params: dict[str, Any], model: str, repeat: int
                       ) -> tuple[ModelParams, TrainingParams]:
    """The variant's merged parameters, validated as the training node's own inputs; the
    training seed moves with the repeat so repeats differ in initialisation too."""
    training = dict(params["training"])
    training["seed"] = int(training["seed"]) + repeat
    return (ModelParams.parse(params["model"], f"{model}.model"),
            TrainingParams.parse(training, f"{model}.training"))


class KerasTrial:
    """The production trial function (see ``engine.TrialFunction``)."""

    def __init__(self, steps: ProjectSteps, model: str, augmented_path: str, tiles_path: str,
                 split_table: pd.DataFrame, evaluation: EvaluationParams, repeat_scheme: str,
                 seed: int, validation_fraction: float):
        self.steps = steps
        self.model = model
        self.augmented_path = str(augmented_path)
        self.tiles_path = str(tiles_path)
        self.split_table = split_table
        self.evaluation = evaluation
        self.repeat_scheme = repeat_scheme
        self.seed = seed
        self.validation_fraction = validation_fraction
        self._stores: dict[str, TileStore] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Stores hold memory-mapped shards: each process opens its own from the paths.
        return {**self.__dict__, "_stores": {}}

    def _store(self, path: str) -> TileStore:
        if path not in self._stores:
            self._stores[path] = TileStore(Path(path))
        return self._stores[path]

    def __call__(self, spec: TrialSpec, context: TrialContext) -> TrialOutcome:
        tiles = self._store(self.tiles_path)
        augmented = self._store(self.augmented_path)
        table = repeat_split_table(self.split_table, self.repeat_scheme, spec.repeat, self.seed,
                                   self.validation_fraction)
        train_store = subset_store(augmented, training_tile_ids(augmented.index, table))
        model_params, training_params = parse_trial_params(spec.params, self.model, spec.repeat)
        logger.info("Trial %d: %d training tiles, %d validation tiles, %d test tiles",
                    spec.number, len(train_store),
                    int((table["split"] == "validation").sum()),
                    int((table["split"] == "test").sum()))
        try:
            model, history = self.steps.train(
                train_store, tiles, table, model_params, training_params,
                callbacks=[pruning_callback(context)],
            )
            tile_predictions = self.steps.predict(model, tiles, table, self.evaluation)
        finally:
            clear_keras_session()
        tile_predictions, diverged = finite_predictions(tile_predictions)
        if diverged:
            logger.warning("Trial %d (%s, repeat %d): the model's outputs are not finite for %d "
                           "test tiles (training diverged); they count as uniform "
                           "probabilities, i.e. predicted as the first class.", spec.number,
                           spec.variant, spec.repeat, diverged)
            context.run.set_tags({"study.diverged": "true"})
        images = self.steps.aggregate(tile_predictions)
        metrics, _, report, counts, normalized = self.steps.evaluate(images, tile_predictions,
                                                                     self.evaluation)
        log_trial(context, history, metrics, report, counts, normalized)
        per_class = {f"f1_{name}": float(values["f1"])
                     for name, values in metrics.get("per_class", {}).items()}
        return TrialOutcome(
            objective=float(history["val_macro_f1"].max()),
            metrics={"f1_macro": float(metrics["f1_macro"]),
                     "accuracy": float(metrics["accuracy"]),
                     "weighted_f1": float(metrics["f1_weighted"]),
                     "macro_f1_ci_low": float(metrics["macro_f1_ci"]["low"]),
                     "macro_f1_ci_high": float(metrics["macro_f1_ci"]["high"]),
                     "diverged": float(diverged > 0),
                     **per_class},
        )


def finite_predictions(tile_predictions: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Tiles whose probabilities are not finite (a diverged model outputs NaN) get uniform
    probabilities, so the argmax picks the first class, as the training's own validation
    score did when it chose the epoch; returns the table and how many tiles were affected.
    A diverged variant is then scored for what it is, a model that learnt nothing, instead
    of stopping the study. Every ``<prefix>prob_<class>`` group is treated (plain and
    test-time-augmented predictions), with its ``<prefix>predicted`` column."""
    groups: dict[str, list[str]] = {}
    for column in map(str, tile_predictions.columns):
        if PROB_PREFIX in column:
            groups.setdefault(column[:column.index(PROB_PREFIX)], []).append(column)
    out, affected = tile_predictions, np.zeros(len(tile_predictions), dtype=bool)
    for prefix, columns in groups.items():
        bad = ~np.isfinite(out[columns].to_numpy(dtype=float)).all(axis=1)
        if not bad.any():
            continue
        out = out.copy() if out is tile_predictions else out
        out.loc[bad, columns] = 1.0 / len(columns)
        if f"{prefix}predicted" in out:
            out.loc[bad, f"{prefix}predicted"] = columns[0][len(prefix) + len(PROB_PREFIX):]
        affected |= bad
    return out, int(affected.sum())


def log_trial(context: TrialContext, history: pd.DataFrame, metrics: dict[str, Any],
               report: pd.DataFrame, counts: pd.DataFrame, normalized: pd.DataFrame) -> None:
    run = context.run
    run.log_history({col: list(zip(history["epoch"].astype(int), history[col].astype(float),
                                   strict=True))
                     for col in HISTORY_COLUMNS if col in history})
    flat = m.flatten_metrics(metrics, prefix="test_")
    run.log_metrics({k: v for k, v in flat.items() if not k.startswith("test_f1.")})
    run.log_text(history.to_csv(index=False), "training_history.csv")
    run.log_text(report.to_csv(index=False), "classification_report.csv")
    run.log_text(counts.to_csv(index=False), "confusion_matrix.csv")
    run.log_figure(m.plot_confusion_matrix(counts, normalized), "confusion_matrix.png")


def pruning_callback(context: TrialContext) -> Any:
    """A Keras callback reporting each epoch's validation macro-F1 to the trial (which prunes
    a hopeless search trial by raising ``optuna.TrialPruned`` out of ``fit``)."""
    import keras  # noqa: PLC0415  (lazy: TensorFlow only once a trial trains)

    class ReportEpoch(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.step = 0

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.step += 1  # counts across stages (ResNet50's head, then fine-tuning)
            value = (logs or {}).get("val_macro_f1")
            if value is not None:
                context.report(self.step, float(value))

    return ReportEpoch()


def clear_keras_session() -> None:
    """Frees the trial's graph: a worker trains many models one after the other."""
    import keras  # noqa: PLC0415  (lazy: as above)

    keras.backend.clear_session()
