"""Parameter groups of the data stages: ``ingestion``, ``splitting``, ``augmentation``.

Re-exported by :mod:`neuroblastoma_cnn.params` (import them from there).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from neuroblastoma_cnn.core.types import (
    DecodeMethod,
    Fraction,
    ImageScopeClass,
    NonNegativeInt,
    OpenFraction,
    PositiveFloat,
    PositiveFraction,
    PositiveInt,
)
from neuroblastoma_cnn.images.decoding import ImageChecks, TilingConfig
from neuroblastoma_cnn.params.base import Params

# ----------------------------------------------------------------------------- data stages


class IngestionParams(TilingConfig, ImageChecks, Params):
    """``ingestion``: which files are images, how patients are found, how tiles are cut."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    group_pattern: str | None
    max_images_per_class: PositiveInt | None  # a seeded random subset per class; None = all
    subset_seed: NonNegativeInt
    shard_size: PositiveInt
    decoding: DecodeMethod  # required here: TilingConfig's default only reads old records
    workers: NonNegativeInt  # processes tiling images; 0 = one per CPU core, 1 = in-process
    # Whole-slide images (required here: TilingConfig's None defaults only read old records).
    tile_um: PositiveFloat | None
    target_mpp: PositiveFloat | None
    slide_fallback_mpp: PositiveFloat | None
    # Slides with annotated regions (QuPath GeoJSON, ImageScope XML beside them).
    min_region_fraction: PositiveFraction
    annotation_classes: list[str] | None
    imagescope_class: ImageScopeClass

    @field_validator("annotation_classes")
    @classmethod
    def _classes_named_once(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        names = [name.strip() for name in value]
        if not names or not all(names) or len(set(names)) < len(names):
            raise ValueError("needs at least one class, each named once (or null: every class "
                             "the annotations name)")
        return names

    @field_validator("group_pattern")
    @classmethod
    def _pattern_has_group(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from exc
        if "group" not in compiled.groupindex:
            raise ValueError(r"needs a named group 'group', e.g. '^(?P<group>[A-Z]+\d+)_'")
        return value

    @property
    def tiling(self) -> TilingConfig:
        return TilingConfig(**self.model_dump(include=set(TilingConfig.model_fields)))

    @property
    def image_checks(self) -> ImageChecks:
        return ImageChecks(**self.model_dump(include=set(ImageChecks.model_fields)))

    @property
    def group_regex(self) -> re.Pattern[str] | None:
        return None if self.group_pattern is None else re.compile(self.group_pattern)


class SplittingParams(Params):
    """``splitting``: how whole patients (or images) are allocated to train/validation/test."""

    strategy: Literal["patient", "image"]
    test_fraction: OpenFraction
    validation_fraction: OpenFraction
    n_folds: NonNegativeInt
    seed: NonNegativeInt

    @model_validator(mode="after")
    def _something_left_to_train_on(self) -> SplittingParams:
        if self.test_fraction + self.validation_fraction >= 1:
            raise ValueError(
                f"test_fraction + validation_fraction = {self.test_fraction} + "
                f"{self.validation_fraction}: must be below 1 so that something is left to "
                "train on")
        return self

    @property
    def unit(self) -> str:
        """The tile-index column whose values are moved whole between splits."""
        return {"patient": "group", "image": "image_path"}[self.strategy]


class AugmentationParams(Params):
    """``augmentation``: how the training split is balanced with transformed copies."""

    target_per_class: NonNegativeInt
    seed: NonNegativeInt
    rotation_degrees: Annotated[float, Field(ge=0.0, le=180.0)]
    width_shift: OpenFraction
    height_shift: OpenFraction
    horizontal_flip: bool
    fill_mode: Literal["reflect", "wrap", "constant", "nearest"]
    vertical_flip: bool
    rotate90: bool
    stain_jitter: OpenFraction
    brightness: Fraction
    contrast: OpenFraction
    grid_samples_per_class: PositiveInt
    batch_size: PositiveInt

