"""Wires augmentation: write the balanced training store, then plot samples read back from it."""

from __future__ import annotations

from typing import Any

from kedro.pipeline import Node, Pipeline

from .nodes import augment_training_set, plot_augmentation_grid


def create_pipeline(**kwargs: Any) -> Pipeline:
    """The grid reads the saved store, so it shows exactly what training will see."""
    return Pipeline(
        [
            Node(
                augment_training_set,
                inputs=["tiles", "split_table", "params:augmentation"],
                outputs="augmented_train_tiles",
                name="augment_training_set",
            ),
            Node(
                plot_augmentation_grid,
                inputs=["augmented_train_tiles", "params:augmentation"],
                outputs="augmentation_grid",
                name="plot_augmentation_grid",
            ),
        ],
        tags="data",
    )
