"""One cross-validation fold: train on the other folds, score the held-out fold, keep the model.

A fold is a trial of the trials engine (``trials/engine.py``), so folds resume after a kill (a
finished fold is never trained again; the fold in progress resumes from its per-epoch backup),
run on several workers and nest as MLflow child runs under the cross-validation's run. Unlike a
study trial, a fold keeps what it made in its folder (``fold_<k>/``): the model, its out-of-fold
and outer-test image predictions and its history. The folder appears complete or not at all (it is
written under a temporary name and renamed), so a kill never leaves a fold that looks done.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd

from neuroblastoma_cnn.analysis.predictions import probability_columns
from neuroblastoma_cnn.core.errors import DataError
from neuroblastoma_cnn.datasets.keras_model import load_keras_model, save_keras_model
from neuroblastoma_cnn.params import EvaluationParams
from neuroblastoma_cnn.trials.engine import TrialContext, TrialOutcome, TrialSpec
from neuroblastoma_cnn.trials.trial import (
    KerasTrial,
    clear_keras_session,
    finite_predictions,
    log_trial,
    parse_trial_params,
    pruning_callback,
    subset_store,
)

from .folds import HELD_OUT, OUTER_SPLIT, as_evaluated, fold_split_table

logger = logging.getLogger(__name__)

MODEL_FILE, HELD_OUT_FILE, OUTER_FILE = "model.keras", "held_out.csv", "outer.csv"
HISTORY_FILE, SUMMARY_FILE = "history.csv", "fold.json"


def fold_dir(root: str | Path, fold: int) -> Path:
    return Path(root) / f"fold_{fold}"


def read_fold(root: str | Path, fold: int) -> dict[str, Any]:
    """A finished fold's summary and image predictions (DataError when it is missing)."""
    folder = fold_dir(root, fold)
    if not (folder / SUMMARY_FILE).exists():
        raise DataError(f"Fold {fold} has no results in '{folder}'.",
                        hint="run the same cross-validation again: it trains the missing folds")
    summary = json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8"))
    outer = folder / OUTER_FILE
    return {"summary": summary, "held_out": _read_images(folder / HELD_OUT_FILE),
            "outer": _read_images(outer) if outer.exists() else None,
            "model_path": folder / MODEL_FILE}


def _read_images(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"image_path": str, "label": str, "group": str,
                                    "predicted": str}, keep_default_na=False)


def load_fold_model(root: str | Path, fold: int) -> Any:
    return load_keras_model(fold_dir(root, fold) / MODEL_FILE)


class FoldTrial(KerasTrial):
    """The production fold function: ``spec.repeat`` is the fold number."""

    def __init__(self, *args: Any, folds: pd.DataFrame, root: str, log_model: bool, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.folds = folds
        self.root = str(root)
        self.log_model = log_model

    def __call__(self, spec: TrialSpec, context: TrialContext) -> TrialOutcome:
        fold = spec.repeat
        if (fold_dir(self.root, fold) / SUMMARY_FILE).exists():
            return self._reuse(fold, context)
        tiles = self._store(self.tiles_path)
        table = fold_split_table(self.split_table, self.folds, fold, self.seed,
                                 self.validation_fraction)
        train_ids = table.loc[table["split"] == "train", "tile_id"].astype(int).tolist()
        model_params, training_params = parse_trial_params(spec.params, self.model, fold)
        logger.info("Fold %d: %d training tiles, %d validation tiles, %d held-out tiles",
                    fold, len(train_ids), int((table["split"] == "validation").sum()),
                    int((table["split"] == HELD_OUT).sum()))
        started = time.perf_counter()
        try:
            model, history = self.steps.train(subset_store(tiles, train_ids), tiles, table,
                                               model_params, training_params,
                                               callbacks=[pruning_callback(context)])
            held_out, diverged = self._predict(model, tiles, table, HELD_OUT)
            outer = (self._predict(model, tiles, table, OUTER_SPLIT)[0]
                     if (table["split"] == OUTER_SPLIT).any() else None)
            images = self.steps.aggregate(held_out)
            staging = self._stage(fold, model, history, images,
                                  None if outer is None else self.steps.aggregate(outer))
        finally:
            clear_keras_session()
        metrics, _, report, counts, normalized = self.steps.evaluate(images, held_out,
                                                                     self.evaluation)
        outcome = {"f1_macro": float(metrics["f1_macro"]), "accuracy": float(metrics["accuracy"]),
                   "diverged": float(diverged > 0),
                   **{f"f1_{name}": float(v["f1"])
                      for name, v in metrics.get("per_class", {}).items()}}
        summary = {"fold": fold, "seconds": time.perf_counter() - started,
                   "val_best": float(history["val_macro_f1"].max()), "diverged_tiles": diverged,
                   "f1_macro": outcome["f1_macro"], "accuracy": outcome["accuracy"],
                   "outcome": outcome}
        _finish(staging, fold_dir(self.root, fold), summary)
        log_trial(context, history, metrics, report, counts, normalized)
        if self.log_model:
            context.run.log_artifact(fold_dir(self.root, fold) / MODEL_FILE, "model")
        return TrialOutcome(objective=summary["val_best"], metrics=outcome)

    def _reuse(self, fold: int, context: TrialContext) -> TrialOutcome:
        """A fold whose folder is complete but whose trial was never recorded (the run was
        killed between the two) is not trained again: its saved result is the trial's."""
        summary = read_fold(self.root, fold)["summary"]
        logger.info("Fold %d is complete in %s (its run stopped before recording it): reused, "
                    "not trained again", fold, fold_dir(self.root, fold))
        context.run.set_tags({"cv.reused_fold_folder": "true"})
        outcome = summary.get("outcome") or {"f1_macro": summary["f1_macro"],
                                             "accuracy": summary["accuracy"]}
        return TrialOutcome(objective=float(summary["val_best"]), metrics=dict(outcome))

    def _predict(self, model: Any, tiles: Any, table: pd.DataFrame, split: str
                 ) -> tuple[pd.DataFrame, int]:
        evaluation: EvaluationParams = self.evaluation.model_copy(update={"split": "test"})
        predictions = self.steps.predict(model, tiles, as_evaluated(table, split), evaluation)
        return finite_predictions(predictions)

    def _stage(self, fold: int, model: Any, history: pd.DataFrame, held_out: pd.DataFrame,
               outer: pd.DataFrame | None) -> Path:
        """Writes the fold's files (image predictions: one row per image) under a temporary
        name next to their final folder."""
        staging = Path(self.root) / f".fold_{fold}.{os.getpid()}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_keras_model(model, staging / MODEL_FILE)
        history.to_csv(staging / HISTORY_FILE, index=False)
        _image_table(held_out).to_csv(staging / HELD_OUT_FILE, index=False)
        if outer is not None:
            _image_table(outer).to_csv(staging / OUTER_FILE, index=False)
        return staging


def _image_table(images: pd.DataFrame) -> pd.DataFrame:
    keep = ["image_path", "label", "group", *probability_columns(images), "predicted"]
    return images[[c for c in keep if c in images]]


def _finish(staging: Path, final: Path, summary: dict[str, Any]) -> None:
    """Completes the fold: its summary last, then one rename (a fold folder left by an
    earlier attempt of the same fold is replaced: same definition, same data)."""
    (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)

