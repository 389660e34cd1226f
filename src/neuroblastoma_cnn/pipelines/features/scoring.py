"""Scoring the predictors (the CNN's softmax and each head) on the same test images: metrics
with group-bootstrap intervals, per-class reports, confusion matrices and ROC figures.

Kept apart from ``nodes.py``: the evaluation of the predictors is independent of how features
are extracted and heads fitted, and reads best next to its figures.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from neuroblastoma_cnn.analysis import metrics as m
from neuroblastoma_cnn.analysis import predictions as pt
from neuroblastoma_cnn.analysis.predictions import aggregate_image_probabilities
from neuroblastoma_cnn.params import EvaluationParams

#: Logged under the node module's name, as before the split (log filters and tests see it).
logger = logging.getLogger("neuroblastoma_cnn.pipelines.features.nodes")


def image_predictions(tile_predictions: pd.DataFrame) -> pd.DataFrame:
    """Mean tile probabilities per image (the evaluation's aggregation), argmax class."""
    images = aggregate_image_probabilities(tile_predictions)
    classes = pt.class_names_of(images)
    images["y_true"] = images["label"].astype(str).map({c: i for i, c in enumerate(classes)})
    prob = images[pt.probability_columns(images)].to_numpy()
    images["predicted"] = [classes[i] for i in prob.argmax(axis=1)]
    return images


def evaluate_one(
    images: pd.DataFrame, tiles: pd.DataFrame, bootstrap_samples: int, seed: int
) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The evaluation's metrics for one predictor: the metrics dict (with the patient-bootstrap
    macro-F1 interval and tile-level scores), the report and both confusion matrices."""
    classes = pt.class_names_of(images)
    y_true = images["y_true"].to_numpy(dtype=int)
    y_prob = images[pt.probability_columns(images)].to_numpy()
    y_pred = y_prob.argmax(axis=1)
    metrics = m.classification_metrics(y_true, y_prob, classes)
    metrics["macro_f1_ci"] = m.bootstrap_macro_f1(
        y_true, y_pred, images["group"].astype(str).to_numpy(), n_boot=bootstrap_samples,
        seed=seed)
    tile_true = tiles["y_true"].to_numpy(dtype=int)
    tile_prob = tiles[pt.probability_columns(tiles)].to_numpy()
    tile_metrics = m.classification_metrics(tile_true, tile_prob, classes)
    metrics["tile"] = {k: tile_metrics[k] for k in ("accuracy", "balanced_accuracy", "f1_macro")}
    metrics["n_test_images"] = len(images)
    metrics["n_test_tiles"] = len(tiles)
    metrics["n_test_groups"] = int(images["group"].nunique())
    report = m.classification_report_frame(y_true, y_pred, classes)
    counts = m.confusion_matrix_frame(y_true, y_pred, classes, normalize=False)
    normalized = m.confusion_matrix_frame(y_true, y_pred, classes, normalize=True)
    return metrics, report, counts, normalized


def evaluate_predictors(
    tile_predictions: pd.DataFrame, evaluation_params: EvaluationParams
) -> tuple[pd.DataFrame, dict[str, Any], dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """Image predictions, metrics (JSON and flat for MLflow), reports and confusion matrices of
    every predictor, each table long with a ``predictor`` column. The bootstrap settings are the
    CNN evaluation's own (``params:evaluation``)."""
    e = evaluation_params if isinstance(evaluation_params, EvaluationParams) else (
        EvaluationParams.parse(evaluation_params, "evaluation"))
    n_boot, seed = e.bootstrap_samples, e.seed
    images_all, metrics, reports, confusion = [], {}, [], []
    for name, group in tile_predictions.groupby("predictor", sort=False):
        tiles = group.drop(columns="predictor").reset_index(drop=True)
        images = image_predictions(tiles)
        result, report, counts, normalized = evaluate_one(images, tiles, n_boot, seed)
        metrics[name] = result
        images_all.append(images.assign(predictor=name))
        reports.append(report.assign(predictor=name))
        confusion.append(counts.assign(predictor=name, normalized=False))
        confusion.append(normalized.assign(predictor=name, normalized=True))
        ci = result["macro_f1_ci"]
        logger.info("%s: macro-F1 %.3f [95%% CI %.3f-%.3f], accuracy %.3f (%d images, %d "
                    "groups)", name, result["f1_macro"], ci["low"], ci["high"],
                    result["accuracy"], result["n_test_images"], result["n_test_groups"])
    mlflow_metrics = {
        f"{name}.{key}": {"value": value, "step": 0}
        for name, result in metrics.items()
        for key, value in m.flatten_metrics(result, prefix="test_").items()
    }
    return (_first(pd.concat(images_all, ignore_index=True), "predictor"), metrics,
            mlflow_metrics, _first(pd.concat(reports, ignore_index=True), "predictor"),
            _first(pd.concat(confusion, ignore_index=True), "predictor"))


def _first(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    return frame[[column, *[c for c in frame.columns if c != column]]]


def plot_predictors(
    image_predictions_long: pd.DataFrame, confusion_long: pd.DataFrame
) -> tuple[Figure, Figure]:
    """Row-normalised confusion matrix and one-vs-rest ROC curves, one panel per predictor."""
    names = list(dict.fromkeys(image_predictions_long["predictor"]))
    classes = pt.class_names_of(image_predictions_long)
    k, n = len(classes), len(names)
    side = max(3.2, 0.5 * k + 2.0)
    confusion_fig = Figure(figsize=(side * n, side + 0.4), layout="constrained")
    roc_fig = Figure(figsize=(4.2 * n, 4.4), layout="constrained")
    conf_axes = np.atleast_1d(confusion_fig.subplots(1, n))
    roc_axes = np.atleast_1d(roc_fig.subplots(1, n))
    for ax_c, ax_r, name in zip(conf_axes, roc_axes, names, strict=True):
        rates = confusion_long[(confusion_long["predictor"] == name)
                               & confusion_long["normalized"].astype(bool)]
        values = rates[classes].to_numpy(dtype=float)
        ax_c.imshow(values, cmap="Blues", vmin=0, vmax=1)
        for i in range(k):
            for j in range(k):
                ax_c.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8,
                          color="white" if values[i, j] > 0.5 else "black")
        ax_c.set_xticks(range(k), classes, rotation=45, ha="right")
        ax_c.set_yticks(range(k), classes)
        ax_c.set_xlabel("Predicted")
        ax_c.set_ylabel("True")
        ax_c.set_title(name)
        images = image_predictions_long[image_predictions_long["predictor"] == name]
        y_true = images["y_true"].to_numpy(dtype=int)
        y_prob = images[pt.probability_columns(images)].to_numpy()
        for index, cls in enumerate(classes):
            positives = y_true == index
            if positives.all() or not positives.any():
                continue
            fpr, tpr, _ = roc_curve(positives, y_prob[:, index])
            ax_r.plot(fpr, tpr, label=f"{cls} ({roc_auc_score(positives, y_prob[:, index]):.2f})")
        ax_r.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax_r.set_title(name)
        ax_r.set_xlabel("False positive rate")
        ax_r.set_ylabel("True positive rate")
        ax_r.legend(loc="lower right", fontsize=7)
    confusion_fig.suptitle("Test images, row-normalised confusion (recall)")
    roc_fig.suptitle("Test images, ROC one vs rest (AUC)")
    return confusion_fig, roc_fig
