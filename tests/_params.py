"""Typed parameter groups for tests: the base YAML's defaults with a test's overrides, validated
as Kedro validates them (the code has no defaults of its own)."""

from __future__ import annotations

from typing import Any

from neuroblastoma_cnn.params import GROUPS, MODEL_GROUPS, base_group
from neuroblastoma_cnn.preprocessing import Preprocessing


def params(key: str, **overrides: Any) -> Any:
    """``params("ingestion", tile_size=32)``, ``params("resnet34.training", epochs=1)``."""
    model = GROUPS.get(key) or MODEL_GROUPS[key.rsplit(".", 1)[-1]]
    return model.parse(base_group(key, **overrides), key)


def store_metadata(classes: list[str], input_size: int, tile_size: int | None = None) -> dict:
    """The metadata ingestion writes into a tile store (its preprocessing record), for stores
    that tests write by hand."""
    ingestion = params("ingestion", input_size=input_size, tile_size=tile_size, stride=tile_size)
    return Preprocessing(classes=classes, image_checks=ingestion.image_checks,
                         tiling=ingestion.tiling, architecture=None).to_dict()
