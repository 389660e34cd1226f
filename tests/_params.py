"""Typed parameter groups for tests: the base YAML's defaults with a test's overrides, validated
as Kedro validates them (the code has no defaults of its own)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from neuroblastoma_cnn.params import GROUPS, MODEL_GROUPS, base_group
from neuroblastoma_cnn.preprocessing import Preprocessing


def params(key: str, **overrides: Any) -> Any:
    """``params("ingestion", tile_size=32)``, ``params("resnet34.training", epochs=1)``."""
    model = GROUPS.get(key) or MODEL_GROUPS[key.rsplit(".", 1)[-1]]
    return model.parse(base_group(key, **overrides), key)


STUDY_PRESET = Path(__file__).resolve().parents[1] / "conf" / "study_preset" / "parameters.yml"


def study_params(key: str, **overrides: Any) -> Any:
    """``params`` with the study's settings (``conf/study_preset``) between the base defaults
    and ``overrides``: tests of the study's path (one shuffled pass an epoch, no online
    augmentation) without repeating its values."""
    preset: Any = yaml.safe_load(STUDY_PRESET.read_text())
    for part in key.split("."):
        preset = preset.get(part, {})
    base = base_group(key)
    merged = {name: ({**base[name], **value} if isinstance(value, dict) else value)
              for name, value in preset.items()}  # nested groups: key by key, as Kedro merges
    return params(key, **{**merged, **overrides})


def store_metadata(classes: list[str], input_size: int, tile_size: int | None = None) -> dict:
    """The metadata ingestion writes into a tile store (its preprocessing record), for stores
    that tests write by hand."""
    ingestion = params("ingestion", input_size=input_size, tile_size=tile_size, stride=tile_size)
    return Preprocessing(classes=classes, image_checks=ingestion.image_checks,
                         tiling=ingestion.tiling, architecture=None).to_dict()
