"""Prediction: classify new images with a trained model, and show where it looked (Grad-CAM).

A model is only ever applied with the preprocessing it was trained with: the image checks and
tiling come from the model's own record
(:class:`~neuroblastoma_cnn.images.preprocessing.Preprocessing`), never from the current
``ingestion`` parameters, and new images go through the same code as the training images
(:mod:`neuroblastoma_cnn.images.decoding`): same decoding, tissue rule, grid and resize.
Image-level probabilities are the mean of the tile probabilities, as in evaluation
(:func:`~neuroblastoma_cnn.analysis.predictions.aggregate_image_probabilities`).

Decisions:

- Every file under the folder is considered, at any depth; hidden and system files (``.DS_Store``,
  ``Thumbs.db``) are skipped. A file that cannot be used gets a row with ``rejected`` and the
  reason (wrong extension, unreadable, corrupt, too small for one tile...), never an exception.
- Mostly background (no tile reaches the model's ``min_tissue_fraction``): the image is predicted
  from its ``background_fallback_tiles`` tiles with the most tissue, and flagged
  ``mostly_background``: a prediction, but one to look at.
- ``low_confidence``: the top image probability is below ``min_confidence``.
- Images are decoded and tiled by ``workers`` threads while the model predicts batches of
  ``batch_size`` tiles (tiles of several images share a batch; the last batch is padded so every
  call has the same shape). Threads suffice: Pillow decodes and resizes, NumPy masks and
  TensorFlow predicts with the GIL released. Decoding follows the record's ``decoding``
  (``reduced``: no more pixels than the model sees), as ingestion did.
- A model trained with stain normalisation carries its reference in the record: new tiles (and
  Grad-CAM's) are normalised with it, as the training tiles were.
- ``tta``: each tile is also predicted under the eight exact symmetries; the mean goes into
  extra columns (``tta_predicted``, ``tta_confidence``) beside the plain prediction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from neuroblastoma_cnn.analysis.predictions import prediction_columns
from neuroblastoma_cnn.analysis.tta import TTA_PREFIX
from neuroblastoma_cnn.core.errors import DataError
from neuroblastoma_cnn.images.decoding import Decoded, ImageRejected
from neuroblastoma_cnn.images.preprocessing import preprocessing_of
from neuroblastoma_cnn.params import PredictParams
from neuroblastoma_cnn.serving.images import (
    PreparedImage,
    Rejection,
    decode_for_prediction,
    list_image_files,
    prepare_image,
    select_tiles,
)
from neuroblastoma_cnn.serving.slide_tiles import LogProgress
from neuroblastoma_cnn.serving.tiles import (
    SLIDE_TILE_COLUMNS,
    _Batcher,
    model_source,
    predict_files,
)

from .overlays import OVERLAY_SUFFIX, gradcam_overlays, heatmap_name, overlay_name, slide_heatmaps
from .slide_geojson import geojson_name, slide_geojsons

#: The nodes, and what the CLI and the tests reach through this module (one image:
#: ``serving.images``; batched prediction: ``serving.tiles``; Grad-CAM and heatmaps:
#: ``overlays``), with the decoded image and the rejection that ``decode_for_prediction`` /
#: ``prepare_image`` use.
__all__ = [
    "OVERLAY_SUFFIX",
    "SLIDE_TILE_COLUMNS",
    "TTA_PREFIX",
    "Decoded",
    "ImageRejected",
    "PreparedImage",
    "Rejection",
    "_Batcher",
    "decode_for_prediction",
    "draw_gradcam_overlays",
    "draw_slide_heatmaps",
    "geojson_name",
    "gradcam_overlays",
    "heatmap_name",
    "list_image_files",
    "model_source",
    "overlay_name",
    "predict_files",
    "predict_images",
    "prediction_columns",
    "prepare_image",
    "preprocessing_of",
    "select_prediction_model",
    "select_tiles",
    "slide_geojsons",
    "slide_heatmaps",
    "write_slide_geojson",
]

logger = logging.getLogger(__name__)


def select_prediction_model(models: Any, params: PredictParams) -> Any:
    """Loads the model the parameters name (``model``, ``version``); its record is checked as it
    is loaded, before any image is read."""
    model = models.load(params.model, params.version)
    if params.head is not None:  # extractor + scikit-learn head, refused unless fitted on it
        from neuroblastoma_cnn.datasets.sklearn_heads import (  # noqa: PLC0415  (lazy: Keras)
            head_classifier,
        )

        model = head_classifier(models.models_dir, model, params.head)
    preprocessing = preprocessing_of(model)
    tiling = preprocessing.tiling
    logger.info(
        "Model %s: classes %s; tiles %s px every %s px, min tissue %.2f, resized to %d px",
        model_source(model), ", ".join(preprocessing.classes), tiling.tile_size or "whole-image",
        tiling.effective_stride or "-", tiling.min_tissue_fraction, tiling.input_size,
    )
    return model


def predict_images(
    images_dir: Path, model: Any, params: PredictParams
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every file under the prediction folder, classified (see :func:`predict_files`)."""
    files = list_image_files(images_dir)
    if not files:
        raise DataError(f"No files to classify in '{images_dir}'.",
                        hint="put images there, in any sub-folders")
    progress = LogProgress("Prepared %d/%d images (%.1f images/s)", len(files))
    return predict_files(files, model, params, progress=progress)


def draw_gradcam_overlays(
    images_dir: Path, model: Any, predictions: pd.DataFrame, tiles: pd.DataFrame,
    params: PredictParams,
) -> dict[str, Callable[[], Any]]:
    """Grad-CAM overlays of the prediction folder's images (a slide's: its gallery of most
    confident tiles), named ``<file>.png`` there."""
    jobs = gradcam_overlays(list_image_files(images_dir), model, predictions, params, tiles)
    return {overlay_name(file): draw for file, draw in jobs.items()}


def draw_slide_heatmaps(
    images_dir: Path, model: Any, predictions: pd.DataFrame, tiles: pd.DataFrame,
    params: PredictParams,
) -> dict[str, Callable[[], Any]]:
    """Class heatmaps of the prediction folder's slides, named ``<file>.heatmap.png``."""
    jobs = slide_heatmaps(list_image_files(images_dir), model, predictions, tiles, params)
    return {heatmap_name(file): draw for file, draw in jobs.items()}


def write_slide_geojson(model: Any, predictions: pd.DataFrame, tiles: pd.DataFrame
                        ) -> dict[str, dict[str, Any]]:
    """Each predicted slide's tiles and summary as a QuPath GeoJSON FeatureCollection, named
    ``<file>.geojson`` (``slide_geojson``)."""
    classes = list(preprocessing_of(model).classes)
    return {geojson_name(file): collection
            for file, collection in slide_geojsons(predictions, tiles, classes).items()}
