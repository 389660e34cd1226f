"""Features pipeline template: instantiated once per model through a Kedro namespace.

`pipeline_registry` wraps it as `resnet34.*` / `resnet50.*`: `<model>_features` selects the
extractor by `params:features.extractors.<model>` (the latest trained model by default), and
`train_<model>_features` feeds it the model trained in the same run.
"""

from __future__ import annotations

from typing import Any

from kedro.pipeline import Node, Pipeline

from .nodes import (
    comparison_table,
    evaluate_predictors,
    extract_feature_table,
    fit_heads,
    plot_predictors,
    predict_evaluation_tiles,
    select_extractor,
)


def create_pipeline(in_run: bool = False, **kwargs: Any) -> Pipeline:
    """Un-namespaced template. ``in_run``: the extractor is the input `model` (trained in the
    same run); otherwise `select_extractor` picks it from `trained_models` by `params:extractor`.
    """
    nodes = []
    if in_run:
        extractor = "model"
    else:
        extractor = "extractor"
        nodes.append(Node(select_extractor, inputs=["trained_models", "tiles", "params:extractor"],
                          outputs="extractor", name="select_extractor"))
    nodes += [
        Node(
            extract_feature_table,
            inputs=[extractor, "tiles", "split_table", "params:features.extraction"],
            outputs="features",
            name="extract_features",
        ),
        Node(
            fit_heads,
            inputs=["features", "split_table", "params:features.heads"],
            outputs=["heads", "heads_cv_results"],
            name="fit_heads",
        ),
        Node(
            predict_evaluation_tiles,
            inputs=["features", "heads", "params:features.heads"],
            outputs="heads_tile_predictions",
            name="predict_heads_test_tiles",
        ),
        Node(
            evaluate_predictors,
            inputs=["heads_tile_predictions", "params:evaluation"],
            outputs=["heads_image_predictions", "heads_test_metrics", "heads_test_metrics_mlflow",
                     "heads_classification_report", "heads_confusion_matrix"],
            name="evaluate_heads",
        ),
        Node(
            comparison_table,
            inputs=["heads_test_metrics", "heads"],
            outputs="heads_comparison",
            name="compare_heads_with_cnn",
        ),
        Node(
            plot_predictors,
            inputs=["heads_image_predictions", "heads_confusion_matrix"],
            outputs=["heads_confusion_matrix_plot", "heads_roc_curves_plot"],
            name="plot_heads",
        ),
    ]
    return Pipeline(nodes, tags=["model", "features"])
