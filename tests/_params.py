"""Typed parameter groups for tests: the base YAML's defaults with a test's overrides, validated
as Kedro validates them (the code has no defaults of its own)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.config import OmegaConfigLoader

from neuroblastoma_cnn.images.preprocessing import Preprocessing
from neuroblastoma_cnn.params import GROUPS, MODEL_GROUPS, base_group


def params(key: str, **overrides: Any) -> Any:
    """``params("ingestion", tile_size=32)``, ``params("resnet34.training", epochs=1)``."""
    return _typed(key, base_group(key, **overrides))


def _typed(key: str, raw: dict[str, Any]) -> Any:
    """``raw`` validated by the parameter model of group ``key``."""
    model = GROUPS.get(key) or MODEL_GROUPS[key.rsplit(".", 1)[-1]]
    return model.parse(raw, key)


CONF = Path(__file__).resolve().parents[1] / "conf"


def environment_parameters(env: str) -> dict[str, Any]:
    """Every parameter of Kedro environment ``env`` merged over base, as `kedro run --env`
    merges them (key by key)."""
    loader = OmegaConfigLoader(str(CONF), base_env="base", default_run_env=env,
                               merge_strategy={"parameters": "soft"})
    return loader["parameters"]


def study_params(key: str, **overrides: Any) -> Any:
    """``params`` with the study's settings (``--env=study_preset``) under ``overrides``: tests
    of the study's path (one shuffled pass an epoch, no online augmentation) without repeating
    its values."""
    value: Any = environment_parameters("study_preset")
    for part in key.split("."):
        value = value[part]
    return _typed(key, {**value, **overrides})


def store_metadata(classes: list[str], input_size: int, tile_size: int | None = None) -> dict:
    """The metadata ingestion writes into a tile store (its preprocessing record), for stores
    that tests write by hand."""
    ingestion = params("ingestion", input_size=input_size, tile_size=tile_size, stride=tile_size)
    return Preprocessing(classes=classes, image_checks=ingestion.image_checks,
                         tiling=ingestion.tiling, architecture=None).to_dict()
