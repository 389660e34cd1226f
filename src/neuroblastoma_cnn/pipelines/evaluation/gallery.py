"""The misclassified gallery: the test images the model got most confidently wrong, drawn with
their true and predicted classes.

Kept apart from ``nodes.py``: picking and drawing pictures for a reviewer is independent of the
metrics and the calibration, and needs the raw images the other nodes never read.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from neuroblastoma_cnn.analysis.gradcam import GradCam, store_image_overlay
from neuroblastoma_cnn.analysis.predictions import (
    class_names_of,
    probability_column,
)
from neuroblastoma_cnn.datasets.tile_store import TileStore
from neuroblastoma_cnn.images.preprocessing import preprocessing_of
from neuroblastoma_cnn.images.stain import as_seen_by_model
from neuroblastoma_cnn.params import EvaluationParams

#: Logged under the node module's name, as before the split (log filters and tests see it).
logger = logging.getLogger("neuroblastoma_cnn.pipelines.evaluation.nodes")


def worst_misclassified(image_predictions: pd.DataFrame, per_class: int) -> pd.DataFrame:
    """Up to ``per_class`` misclassified images of each true class, least true-class probability
    first (the model's most confident mistakes)."""
    classes = class_names_of(image_predictions)
    frame = image_predictions.copy()
    frame["label"] = frame["label"].astype(str)
    frame["predicted"] = frame["predicted"].astype(str)
    wrong = frame[frame["label"] != frame["predicted"]].copy()
    if wrong.empty:
        return wrong.assign(true_probability=pd.Series(dtype=float))
    wrong["true_probability"] = [
        float(row[probability_column(row["label"])]) if row["label"] in classes else np.nan
        for _, row in wrong.iterrows()
    ]
    wrong = wrong.sort_values(["label", "true_probability", "image_path"])
    return wrong.groupby("label", sort=True).head(per_class).reset_index(drop=True)


def misclassified_gallery(
    model: Any, tiles: TileStore, image_predictions: pd.DataFrame, params: EvaluationParams
) -> Figure:
    """Figure of the worst misclassified test images per true class, with Grad-CAM overlays of
    the (wrongly) predicted class: what misled the model.

    One row per class that has mistakes, up to ``misclassified_per_class`` images a row.
    Images are rebuilt from the test tiles in the tile store, so nothing is decoded again.
    """
    per_class = params.misclassified_per_class
    classes = class_names_of(image_predictions)
    worst = worst_misclassified(image_predictions, per_class)
    if worst.empty:
        fig = Figure(figsize=(6, 2), layout="constrained")
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, f"No misclassified images among {len(image_predictions)}.",
                ha="center", va="center")
        return fig
    labels = sorted(worst["label"].unique())
    columns = int(worst.groupby("label").size().max())
    fig = Figure(figsize=(3.4 * columns, 3.0 * len(labels) + 0.4), layout="constrained")
    axes = fig.subplots(len(labels), columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    cam = GradCam(model, batch_size=params.batch_size)
    tiles = as_seen_by_model(tiles, preprocessing_of(model).stain_reference)
    for row, label in enumerate(labels):
        # Records, not itertuples: class names need not be valid identifiers.
        for col, item in enumerate(worst[worst["label"] == label].to_dict("records")):
            predicted = str(item["predicted"])
            picture = store_image_overlay(cam, tiles, item["image_path"],
                                          classes.index(predicted))
            ax = axes[row, col]
            ax.imshow(picture)
            ax.set_title(
                f"{item['image_path']}\ntrue {label} ({item['true_probability']:.2f}) -> "
                f"{predicted} ({item[probability_column(predicted)]:.2f})",
                fontsize=8,
            )
    fig.suptitle(f"Worst misclassified images per class: Grad-CAM of the predicted class "
                 f"(layer {cam.layer_name})", fontsize=10)
    logger.info("Misclassified gallery: %d images of %d classes", len(worst), len(labels))
    return fig
