"""The classical floor on the run's own split, for the model card.

Why: on small histology sets a CNN's macro-F1 means little alone; colour and texture
statistics with an RBF SVM (``models.classical``, the same floor cross-validation uses) often
score as well in seconds. Fitted on the split's training images and scored on the images the
model is evaluated on, it gives the card a number to compare with, with the same patient
bootstrap interval. It never fails a training run: when it cannot be fitted (too few patient
groups, images too small) the reason is reported instead.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neuroblastoma_cnn.analysis import metrics as m
from neuroblastoma_cnn.core.errors import DataError
from neuroblastoma_cnn.params import CrossValidationParams, EvaluationParams

logger = logging.getLogger(__name__)

DESCRIPTION = "colour and texture statistics + RBF SVM (models.classical)"


def score_floor(split_table: pd.DataFrame, raw_images: Path,
                cross_validation: CrossValidationParams,
                evaluation: EvaluationParams) -> dict[str, Any]:
    """The floor fitted on the ``train`` images and scored on ``evaluation.split``: macro-F1
    with its patient-bootstrap interval, accuracy and image counts; ``{"skipped": reason}``
    when disabled or when it cannot be fitted."""
    floor = cross_validation.floor
    if not floor.enabled:
        return {"skipped": "cross_validation.floor.enabled is false"}
    started = time.perf_counter()
    images = split_table.drop_duplicates("image_path")  # the split table has a row per tile
    train = images[images["split"] == "train"]
    scored = images[images["split"] == evaluation.split]
    try:
        prob, classes = _fit_and_predict(train, scored, Path(raw_images), cross_validation)
    except (DataError, ValueError) as exc:
        logger.warning("Classical floor not scored: %s", exc)
        return {"skipped": str(exc)}
    labels = scored["label"].astype(str).to_numpy()
    index = {c: i for i, c in enumerate(classes)}
    y_true = np.array([index[label] for label in labels])
    y_pred = prob.argmax(axis=1)
    result = m.classification_metrics(y_true, prob, classes)
    out = {key: result[key] for key in ("f1_macro", "accuracy", "balanced_accuracy")}
    out["macro_f1_ci"] = m.bootstrap_macro_f1(
        y_true, y_pred, scored["group"].astype(str).to_numpy(),
        n_boot=evaluation.bootstrap_samples, seed=evaluation.seed)
    out.update(model=DESCRIPTION, split=evaluation.split, n_images=len(scored),
               n_train_images=len(train), downscale=floor.downscale,
               seconds=round(time.perf_counter() - started, 2))
    logger.info("Classical floor on the %s split: macro-F1 %.3f (%.1f s)", evaluation.split,
                out["f1_macro"], out["seconds"])
    return out


def _fit_and_predict(train: pd.DataFrame, scored: pd.DataFrame, root: Path,
                     params: CrossValidationParams) -> tuple[np.ndarray, list[str]]:
    from neuroblastoma_cnn.models.classical import (  # noqa: PLC0415  (scikit-learn, lazily)
        ColourTextureSVM,
        describe_images,
    )

    if scored.empty or train.empty:
        raise ValueError("the split has no training or no evaluated images")
    classes = sorted(set(train["label"].astype(str)) | set(scored["label"].astype(str)))
    floor = params.floor
    svm = ColourTextureSVM(floor.c_grid, floor.gamma_factors, floor.inner_folds,
                           floor.calibration, seed=params.seed)
    features = describe_images([root / p for p in train["image_path"]], floor.downscale)
    svm.fit(features, train["label"].astype(str).to_numpy(),
            train["group"].astype(str).to_numpy())
    tested = describe_images([root / p for p in scored["image_path"]], floor.downscale)
    return svm.probabilities_over(tested, classes), classes
