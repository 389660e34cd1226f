"""Prediction tables: the ``prob_<class>`` columns and image-level probabilities.

Evaluation (test tiles), prediction (new images) and Grad-CAM read and write the same tables,
so the conventions live here: one ``prob_<class>`` column per class, in label order (so the
class names can be read back from a table), and an image's probabilities are the mean of its
tiles'.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from neuroblastoma_cnn.analysis.calibration import apply_temperature
from neuroblastoma_cnn.core.errors import DataError

PROB_PREFIX = "prob_"
#: Boolean flags of a prediction row.
FLAG_COLUMNS = ["low_confidence", "mostly_background", "rejected"]


def model_probabilities(model: Any, output: Any) -> np.ndarray:
    """The probabilities a model reports for its raw softmax ``output``: float64, with the
    temperature of its preprocessing record applied (``softmax(log p / T)``; none: as is).

    The one place where a model's outputs become its probabilities: evaluation, test-time
    augmentation and prediction (pipeline and command line) all pass through here.
    """
    record = getattr(model, "preprocessing", None)
    return apply_temperature(output, getattr(record, "temperature", None))


def probability_column(class_name: str) -> str:
    return f"{PROB_PREFIX}{class_name}"


def probability_columns(frame: pd.DataFrame) -> list[str]:
    """The ``prob_<class>`` columns of a predictions table, in class order."""
    return [c for c in frame.columns if str(c).startswith(PROB_PREFIX)]


def class_names_of(frame: pd.DataFrame) -> list[str]:
    """Class names in label order, read from a predictions table's ``prob_<class>`` columns."""
    return [str(c)[len(PROB_PREFIX):] for c in probability_columns(frame)]


def prediction_columns(classes: Sequence[str]) -> list[str]:
    """Columns of the per-file predictions table, in order."""
    return ["file", "predicted", *(probability_column(c) for c in classes), "n_tiles",
            *FLAG_COLUMNS, "reason", "width", "height", "model"]


def aggregate_image_probabilities(tile_frame: pd.DataFrame) -> pd.DataFrame:
    """Image-level predictions: the mean of the tile probabilities of each source image.

    Input: one row per tile with ``image_path, label, group`` and one ``prob_<class>`` column per
    class (other columns are ignored). Output: one row per image, sorted by ``image_path``, with
    columns ``image_path, label, group, n_tiles, prob_<class>...`` (same class order).
    """
    required = ["image_path", "label", "group"]
    missing = [c for c in required if c not in tile_frame.columns]
    prob_columns = probability_columns(tile_frame)
    if missing or not prob_columns:
        raise DataError(
            f"Tile frame lacks column(s) {missing + ([] if prob_columns else ['prob_<class>'])}; "
            f"it has {list(tile_frame.columns)}."
        )
    grouped = tile_frame.groupby("image_path", sort=True)
    conflicting = grouped[["label", "group"]].nunique(dropna=False).max(axis=1) > 1
    if conflicting.any():
        raise DataError(
            "Tiles of one image carry different labels or groups: "
            f"{sorted(conflicting[conflicting].index)[:5]}."
        )
    out = grouped[["label", "group"]].first()
    out["n_tiles"] = grouped.size()
    out[prob_columns] = grouped[prob_columns].mean()
    return out.reset_index()
