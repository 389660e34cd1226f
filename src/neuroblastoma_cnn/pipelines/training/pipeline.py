"""Training pipeline template: instantiated once per model through a Kedro namespace."""

from kedro.pipeline import Node, Pipeline

from .nodes import history_metrics, plot_training_input, train_model


def create_pipeline(**kwargs) -> Pipeline:
    """Un-namespaced template; `pipeline_registry` wraps it as `resnet34.*` and `resnet50.*`."""
    return Pipeline(
        [
            Node(
                train_model,
                inputs=["augmented_train_tiles", "tiles", "split_table", "params:model",
                        "params:training"],
                outputs=["trained_model", "training_history"],
                name="train_model",
                tags=["model"],
            ),
            Node(
                plot_training_input,
                inputs=["augmented_train_tiles", "tiles", "split_table", "params:training"],
                outputs="training_input_plot",
                name="plot_training_input",
                tags=["model"],
            ),
            Node(
                history_metrics,
                inputs="training_history",
                outputs="training_metrics",
                name="log_training_history",
                tags=["model"],
            ),
        ]
    )
