"""Evaluation nodes: test predictions per tile and per image, metrics, figures.

Image-level results (mean of tile probabilities) are the primary numbers, because a pathologist
grades an image, not a tile; tile-level numbers are reported beside them with a ``tile_`` prefix.
The confidence interval resamples groups (patients), never tiles.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from neuroblastoma_cnn.datasets.tile_store import TileStore
from neuroblastoma_cnn.pipelines.training.nodes import (
    class_names,
    encode_labels,
    make_tf_dataset,
    split_tile_ids,
)

from . import metrics as m

logger = logging.getLogger(__name__)


def predict_split_tiles(
    model: Any, tiles: TileStore, split_table: pd.DataFrame, params: dict[str, Any]
) -> pd.DataFrame:
    """Class probabilities for every tile of one split (default: test)."""
    split = params.get("split", "test")
    ids = split_tile_ids(split_table, split)
    if not ids:
        raise ValueError(f"The split table has no '{split}' tiles to evaluate.")
    classes = class_names(tiles)
    record = getattr(model, "preprocessing", None) or {}
    if record.get("classes") and list(record["classes"]) != classes:
        raise ValueError(
            f"The model was trained on classes {record['classes']} but the tiles have {classes}."
        )
    rows = tiles.rows(ids)
    data = make_tf_dataset(tiles, ids, None, int(params.get("batch_size", 64)),
                           in_memory_limit_mb=float(params.get("in_memory_limit_mb", 2048)))
    prob = np.asarray(model.predict(data, verbose=0), dtype=np.float64)
    out = rows[["tile_id", "image_path", "label", "group"]].copy()
    out["y_true"] = encode_labels(rows["label"], classes)
    for i, name in enumerate(classes):
        out[f"{m.PROB_PREFIX}{name}"] = prob[:, i]
    out["predicted"] = [classes[i] for i in prob.argmax(axis=1)]
    logger.info("Predicted %d %s tiles from %d images", len(out), split,
                out["image_path"].nunique())
    return out


def aggregate_image_predictions(tile_predictions: pd.DataFrame) -> pd.DataFrame:
    """One row per source image: the mean of its tiles' probabilities and the argmax class."""
    images = m.aggregate_image_probabilities(tile_predictions)
    classes = m.class_names_of(images)
    images["y_true"] = images["label"].astype(str).map({c: i for i, c in enumerate(classes)})
    images["predicted"] = [
        classes[i] for i in images[m.probability_columns(images)].to_numpy().argmax(axis=1)
    ]
    return images


def compute_test_metrics(
    image_predictions: pd.DataFrame, tile_predictions: pd.DataFrame, params: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Metrics, classification report and confusion matrices of the test images.

    Returns the full metrics (JSON), the flat numeric ones for MLflow, the report and the
    confusion matrix as counts and row-normalised.
    """
    classes = m.class_names_of(image_predictions)
    y_true = image_predictions["y_true"].to_numpy(dtype=int)
    y_prob = image_predictions[m.probability_columns(image_predictions)].to_numpy()
    y_pred = y_prob.argmax(axis=1)
    metrics = m.classification_metrics(y_true, y_prob, classes)
    metrics["macro_f1_ci"] = m.bootstrap_macro_f1(
        y_true, y_pred, image_predictions["group"].astype(str).to_numpy(),
        n_boot=int(params.get("bootstrap_samples", 1000)), seed=int(params.get("seed", 0)),
    )
    tile_true = tile_predictions["y_true"].to_numpy(dtype=int)
    tile_prob = tile_predictions[m.probability_columns(tile_predictions)].to_numpy()
    tile_metrics = m.classification_metrics(tile_true, tile_prob, classes)
    metrics["tile"] = {k: tile_metrics[k] for k in ("accuracy", "balanced_accuracy", "f1_macro")}
    metrics["n_test_images"] = len(image_predictions)
    metrics["n_test_tiles"] = len(tile_predictions)
    metrics["n_test_groups"] = int(image_predictions["group"].nunique())

    flat = m.flatten_metrics(metrics, prefix="test_")
    mlflow_metrics = {k: {"value": v, "step": 0} for k, v in flat.items()}
    report = m.classification_report_frame(y_true, y_pred, classes)
    counts = m.confusion_matrix_frame(y_true, y_pred, classes, normalize=False)
    normalized = m.confusion_matrix_frame(y_true, y_pred, classes, normalize=True)
    ci = metrics["macro_f1_ci"]
    logger.info(
        "Test (%d images, %d groups): macro-F1 %.3f [95%% CI %.3f-%.3f], accuracy %.3f",
        len(image_predictions), metrics["n_test_groups"], metrics["f1_macro"], ci["low"],
        ci["high"], metrics["accuracy"],
    )
    return metrics, mlflow_metrics, report, counts, normalized


def plot_evaluation(
    image_predictions: pd.DataFrame,
    confusion_counts: pd.DataFrame,
    confusion_normalized: pd.DataFrame,
    training_history: pd.DataFrame,
) -> tuple[Any, Any, Any]:
    """Confusion matrix, training curves and ROC figures for 08_reporting and MLflow."""
    classes = m.class_names_of(image_predictions)
    y_true = image_predictions["y_true"].to_numpy(dtype=int)
    y_prob = image_predictions[m.probability_columns(image_predictions)].to_numpy()
    return (
        m.plot_confusion_matrix(confusion_counts, confusion_normalized),
        m.plot_training_curves(training_history),
        m.plot_roc_curves(y_true, y_prob, classes),
    )
