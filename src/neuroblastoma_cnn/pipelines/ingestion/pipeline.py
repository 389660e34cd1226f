"""Wires the ingestion nodes: check every raw file, then stream tissue tiles into the store."""

from __future__ import annotations

from typing import Any

from kedro.pipeline import Node, Pipeline

from .nodes import build_image_manifest, tile_images


def create_pipeline(**kwargs: Any) -> Pipeline:
    """Tiling reads the saved manifest, so it only ever sees images that passed every check."""
    return Pipeline(
        [
            Node(
                build_image_manifest,
                inputs=["raw_images", "params:ingestion"],
                outputs=["image_manifest", "rejected_images"],
                name="build_image_manifest",
            ),
            Node(
                tile_images,
                inputs=["raw_images", "image_manifest", "params:ingestion"],
                outputs="tiles",
                name="tile_images",
            ),
        ],
        tags="data",
    )
