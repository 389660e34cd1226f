"""Wires prediction: pick the model, classify every image under the folder, draw Grad-CAM."""

from __future__ import annotations

from typing import Any

from kedro.pipeline import Node, Pipeline

from .nodes import (
    draw_gradcam_overlays,
    draw_slide_heatmaps,
    predict_images,
    select_prediction_model,
    write_slide_geojson,
)


def create_pipeline(**kwargs: Any) -> Pipeline:
    """The model is chosen by `params:predict` (model, version) among `trained_models`; how
    images are tiled comes from the model's own record, never from `params:ingestion`."""
    return Pipeline(
        [
            Node(
                select_prediction_model,
                inputs=["trained_models", "params:predict"],
                outputs="prediction_model",
                name="select_prediction_model",
            ),
            Node(
                predict_images,
                inputs=["images_to_predict", "prediction_model", "params:predict"],
                outputs=["predictions", "predicted_tiles"],
                name="predict_images",
            ),
            Node(
                draw_gradcam_overlays,
                inputs=["images_to_predict", "prediction_model", "predictions",
                        "predicted_tiles", "params:predict"],
                outputs="gradcam_overlays",
                name="draw_gradcam_overlays",
            ),
            Node(
                draw_slide_heatmaps,
                inputs=["images_to_predict", "prediction_model", "predictions",
                        "predicted_tiles", "params:predict"],
                outputs="slide_heatmaps",
                name="draw_slide_heatmaps",
            ),
            Node(
                write_slide_geojson,
                inputs=["prediction_model", "predictions", "predicted_tiles"],
                outputs="slide_geojson",
                name="write_slide_geojson",
            ),
        ],
        tags="predict",
    )
