"""Evaluation pipeline template: instantiated once per model through a Kedro namespace."""

from kedro.pipeline import Node, Pipeline

from .nodes import (
    aggregate_image_predictions,
    compute_test_metrics,
    misclassified_gallery,
    plot_evaluation,
    predict_split_tiles,
)


def create_pipeline(**kwargs) -> Pipeline:
    """Un-namespaced template; `pipeline_registry` wraps it as `resnet34.*` and `resnet50.*`."""
    return Pipeline(
        [
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
                inputs=["image_predictions", "tile_predictions", "params:evaluation"],
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
                misclassified_gallery,
                inputs=["model", "tiles", "image_predictions", "params:evaluation"],
                outputs="misclassified_gallery",
                name="plot_misclassified_gallery",
            ),
        ],
        tags=["model", "evaluation"],
    )
