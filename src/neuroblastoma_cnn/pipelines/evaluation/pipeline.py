"""Evaluation pipeline template: instantiated once per model through a Kedro namespace."""

from kedro.pipeline import Node, Pipeline

from .floor import score_floor
from .nodes import (
    aggregate_image_predictions,
    calibrate_model,
    compute_test_metrics,
    misclassified_gallery,
    plot_evaluation,
    plot_test_reliability,
    predict_split_tiles,
    write_model_card,
)


def create_pipeline(**kwargs) -> Pipeline:
    """Un-namespaced template; `pipeline_registry` wraps it as `resnet34.*` and `resnet50.*`."""
    return Pipeline(
        [
            Node(
                calibrate_model,
                inputs=["trained_model", "tiles", "split_table", "params:evaluation"],
                outputs=["model", "calibration", "validation_reliability_plot"],
                name="calibrate_model",
            ),
            Node(
                predict_split_tiles,
                inputs=["model", "tiles", "split_table", "params:evaluation"],
                outputs="tile_predictions",
                name="predict_test_tiles",
            ),
            Node(
                aggregate_image_predictions,
                inputs="tile_predictions",
                outputs="image_predictions",
                name="aggregate_image_predictions",
            ),
            Node(
                compute_test_metrics,
                inputs=["image_predictions", "tile_predictions", "params:evaluation",
                        "calibration"],
                outputs=["test_metrics", "test_metrics_mlflow", "classification_report",
                         "confusion_matrix", "confusion_matrix_normalized"],
                name="compute_test_metrics",
            ),
            Node(
                plot_evaluation,
                inputs=["image_predictions", "confusion_matrix", "confusion_matrix_normalized",
                        "training_history"],
                outputs=["confusion_matrix_plot", "training_curves_plot", "roc_curves_plot"],
                name="plot_evaluation",
            ),
            Node(
                plot_test_reliability,
                inputs=["tile_predictions", "calibration"],
                outputs="test_reliability_plot",
                name="plot_test_reliability",
            ),
            Node(
                score_floor,
                inputs=["split_table", "raw_images", "params:cross_validation",
                        "params:evaluation"],
                outputs="floor_metrics",
                name="score_floor",
            ),
            Node(
                write_model_card,
                inputs=["test_metrics", "training_history", "split_table", "tiles",
                        "params:model", "params:training", "params:evaluation", "run_context",
                        "floor_metrics"],
                outputs=["model_card", "model_card_html"],
                name="write_model_card",
            ),
            Node(
                misclassified_gallery,
                inputs=["model", "tiles", "image_predictions", "params:evaluation"],
                outputs="misclassified_gallery",
                name="plot_misclassified_gallery",
            ),
        ],
        tags=["model", "evaluation"],
    )
