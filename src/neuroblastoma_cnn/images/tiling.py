"""The tile grid over an image at its decoding scale: :class:`TilingConfig` (the only tiling
API), the tissue rule, the resize filter, and :class:`Decoded` (an image at ``1/scale``), which
decoding produces and tiling consumes.

The decisions (tissue rule, grid, resizing, ``full`` or ``reduced`` decoding) are described in
:mod:`neuroblastoma_cnn.images.decoding`, which re-exports every name here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, NamedTuple

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from neuroblastoma_cnn.core.types import (
    DecodeMethod,
    Fraction,
    OpenFraction,
    PositiveFloat,
    PositiveInt,
)

#: One filter for every resize, so training and prediction tiles match pixel for pixel.
RESIZE_FILTER = Image.Resampling.BILINEAR

#: Tiling fields that only whole-slide images use (absent from older and crop-only records).
SLIDE_TILING_FIELDS = frozenset({"tile_um", "target_mpp", "slide_fallback_mpp"})


def _is_none(value: object) -> bool:
    return value is None


class Decoded(NamedTuple):
    """An image decoded at ``1/scale`` of its native size; ``width`` and ``height`` are native
    (after EXIF orientation), so tile positions and size checks do not depend on the scale."""

    rgb: np.ndarray
    scale: int
    width: int
    height: int
    mode: str

    @classmethod
    def native(cls, rgb: np.ndarray, mode: str = "RGB") -> Decoded:
        """Pixels already in memory, at native resolution."""
        rgb = np.asarray(rgb)
        return cls(rgb, 1, int(rgb.shape[1]), int(rgb.shape[0]), mode)


class Tile(NamedTuple):
    """One tile: resized pixels, top-left corner at native resolution, tissue share."""

    tile: np.ndarray
    x: int
    y: int
    tissue_fraction: float


def reduce_rgb(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Box-average reduction by an integer factor (a partial last block averages what it has),
    so that reduced pixel ``(i, j)`` covers native pixels ``factor*i .. factor*(i+1) - 1``."""
    if factor == 1:
        return rgb
    reduced = Image.fromarray(np.ascontiguousarray(rgb)).reduce(factor)
    return np.asarray(reduced, dtype=np.uint8)


def tissue_mask(rgb: np.ndarray, *, min_saturation: float, white_level: int) -> np.ndarray:
    """Boolean mask of tissue pixels: saturated (HSV S > min_saturation) and not near-white."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"Expected a uint8 [H, W, 3] array, got {rgb.dtype} {rgb.shape}")
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    brightest = np.maximum(np.maximum(red, green), blue)  # 10x faster than max(axis=2)
    darkest = np.minimum(np.minimum(red, green), blue)
    brightest_f = brightest.astype(np.float32)
    # S = chroma / max; compared without dividing, which also makes black (max 0) background.
    saturated = (brightest_f - darkest) > np.float32(min_saturation) * brightest_f
    return saturated & (darkest < white_level)


def resize_tile(tile: np.ndarray, input_size: int) -> np.ndarray:
    """Resizes a uint8 RGB tile to ``input_size`` squared with the project's one filter."""
    if tile.shape[0] == input_size and tile.shape[1] == input_size:
        return np.ascontiguousarray(tile)
    resized = Image.fromarray(np.ascontiguousarray(tile)).resize(
        (input_size, input_size), RESIZE_FILTER
    )
    return np.asarray(resized, dtype=np.uint8)


class TilingConfig(BaseModel):
    """How an image becomes model inputs: decoding scale, grid, tissue rule, threshold, resize.
    The only tiling API: ingestion, prediction and Grad-CAM all cut tiles through one of these.

    Its methods take a :class:`Decoded` image (from :meth:`ImageChecks.decode_for`) or a plain
    native-resolution RGB array, which a ``reduced`` tiling first box-reduces (as it would a
    PNG of those pixels)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    tile_size: PositiveInt | None
    stride: PositiveInt | None
    min_tissue_fraction: Fraction
    input_size: PositiveInt
    tissue_min_saturation: OpenFraction
    tissue_white_level: Annotated[int, Field(ge=1, le=256)]
    #: Not a parameter default (``ingestion.decoding`` is required): what a record written before
    #: the field existed means, so that older models keep predicting as they were trained.
    decoding: DecodeMethod = "full"
    #: Whole-slide images only (:mod:`.slides`): a tile's edge in microns, or
    #: the resolution ``tile_size`` is counted at; None (also what older records mean) = pixels.
    #: Left out of the record when None, so crop-only records stay as they were.
    tile_um: PositiveFloat | None = Field(default=None, exclude_if=_is_none)
    target_mpp: PositiveFloat | None = Field(default=None, exclude_if=_is_none)
    #: Microns per pixel assumed for a slide whose metadata has none; None = such a slide is
    #: rejected when ``tile_um`` or ``target_mpp`` needs a resolution.
    slide_fallback_mpp: PositiveFloat | None = Field(default=None, exclude_if=_is_none)

    @model_validator(mode="after")
    def _one_physical_size(self) -> TilingConfig:
        if self.tile_um is not None and self.target_mpp is not None:
            raise ValueError("tile_um and target_mpp are alternatives: set one, the other null")
        if self.target_mpp is not None and self.tile_size is None:
            raise ValueError("target_mpp counts tile_size pixels at that resolution: set "
                             "tile_size too")
        return self

    @property
    def effective_stride(self) -> int | None:
        return None if self.tile_size is None else (self.stride or self.tile_size)

    @property
    def tissue_rule(self) -> str:
        return (f"HSV saturation > {self.tissue_min_saturation} and darkest channel < "
                f"{self.tissue_white_level}")

    def footprint(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` of one tile at native resolution in a ``width x height`` image."""
        return (width, height) if self.tile_size is None else (self.tile_size, self.tile_size)

    def positions(self, width: int, height: int) -> list[tuple[int, int]]:
        """Top-left corners ``(x, y)`` of the tile grid, row by row; empty if no tile fits."""
        if self.tile_size is None:
            return [(0, 0)]
        step = self.effective_stride
        return [
            (x, y)
            for y in range(0, height - self.tile_size + 1, step)
            for x in range(0, width - self.tile_size + 1, step)
        ]

    def reduction(self, width: int, height: int) -> int:
        """The decoding scale ``1/r`` for a ``width x height`` image: 1 with ``full``;
        with ``reduced`` the largest power of two that keeps a tile at least ``input_size`` a
        side and divides tile size and stride (tiles fall on whole reduced pixels)."""
        if self.decoding == "full":
            return 1
        tile_w, tile_h = self.footprint(width, height)
        factor = 1
        while True:
            step = 2 * factor
            if tile_w // step < self.input_size or tile_h // step < self.input_size:
                return factor
            if self.tile_size is not None and (self.tile_size % step
                                               or self.effective_stride % step):
                return factor
            factor = step

    def at_scale(self, image: np.ndarray | Decoded) -> Decoded:
        """The image at this tiling's decoding scale (a native array is box-reduced)."""
        decoded = image if isinstance(image, Decoded) else Decoded.native(image)
        factor = self.reduction(decoded.width, decoded.height)
        if decoded.scale == factor:
            return decoded
        if factor < decoded.scale or factor % decoded.scale:
            raise ValueError(f"An image decoded at 1/{decoded.scale} scale cannot be tiled at "
                             f"1/{factor} (decoding: {self.decoding})")
        return decoded._replace(rgb=reduce_rgb(decoded.rgb, factor // decoded.scale),
                                scale=factor)

    def tissue_fraction(self, rgb: np.ndarray) -> float:
        """Share of tissue pixels in an RGB image or tile, in [0, 1]."""
        mask = self.tissue_mask(rgb)
        return float(mask.mean()) if mask.size else 0.0

    def tissue_mask(self, rgb: np.ndarray) -> np.ndarray:
        """This tiling's tissue rule, pixel by pixel."""
        return tissue_mask(rgb, min_saturation=self.tissue_min_saturation,
                           white_level=self.tissue_white_level)

    def _window(self, image: Decoded, pixels: np.ndarray, x: int, y: int) -> np.ndarray:
        """The pixels (or mask) of the tile at native ``(x, y)`` in an image at its scale."""
        if self.tile_size is None:
            return pixels
        scale, side = image.scale, self.tile_size // image.scale
        return pixels[y // scale : y // scale + side, x // scale : x // scale + side]

    def _scored(self, image: Decoded) -> list[tuple[int, int, float]]:
        # One mask for the whole image, counted per window: the same fractions as masking each
        # window, without recomputing overlaps.
        mask = self.tissue_mask(image.rgb)
        scores = []
        for x, y in self.positions(image.width, image.height):
            window = self._window(image, mask, x, y)
            fraction = np.count_nonzero(window) / window.size if window.size else 0.0
            scores.append((x, y, float(fraction)))
        return scores

    def _tile_at(self, image: Decoded, x: int, y: int, fraction: float) -> Tile:
        return Tile(resize_tile(self._window(image, image.rgb, x, y), self.input_size), x, y,
                    fraction)

    def score(self, image: np.ndarray | Decoded) -> list[tuple[int, int, float]]:
        """``(x, y, tissue_fraction)`` of every grid tile, kept or not, without resizing."""
        return self._scored(self.at_scale(image))

    def iter_tiles(self, image: np.ndarray | Decoded) -> Iterator[Tile]:
        """The kept tiles of one image, resized, one at a time."""
        decoded = self.at_scale(image)
        for x, y, fraction in self._scored(decoded):
            if fraction >= self.min_tissue_fraction:
                yield self._tile_at(decoded, x, y, fraction)

    def tile(self, image: np.ndarray | Decoded) -> list[Tile]:
        """Every kept tile of one image (what training saw for an image like this one)."""
        return list(self.iter_tiles(image))

    def tiles_or_fallback(
        self, image: np.ndarray | Decoded, fallback_tiles: int
    ) -> tuple[list[Tile], bool]:
        """The kept tiles; if none, the ``fallback_tiles`` with the most tissue (in grid order).

        Returns ``(tiles, mostly_background)``: a prediction for an image with little tissue
        is still made, but flagged.
        """
        decoded = self.at_scale(image)
        scores = self._scored(decoded)
        kept = [s for s in scores if s[2] >= self.min_tissue_fraction]
        if kept:
            return [self._tile_at(decoded, *s) for s in kept], False
        best = sorted(scores, key=lambda s: (-s[2], s[1], s[0]))[:fallback_tiles]
        best.sort(key=lambda s: (s[1], s[0]))
        return [self._tile_at(decoded, *s) for s in best], True
