"""Images to tiles: decoding, the tissue rule, the tile grid, and why a file is rejected.

Ingestion (training images) and prediction (new images) both call this module, so a new image
is decoded, checked, tiled and resized exactly like the training images were.

Decisions (see also ``conf/base/parameters_ingestion.yml``):

- Decoding: only TIFF, PNG, JPEG and BMP content is accepted (whatever the extension says); the
  first frame of multi-page files is used; EXIF orientation is applied; every colour mode becomes
  8-bit RGB (alpha composited on white, 16-bit scaled by 255/65535, CMYK via Pillow). ICC
  profiles are not applied.
- Tissue: a pixel is tissue when its HSV saturation is above ``tissue_min_saturation`` and it is
  not near-white (its darkest channel is below ``tissue_white_level``). So bright glass, fat
  vacuoles and faintly tinted background are not tissue, nor are grey or black pixels (slide
  borders, pen marks, debris).
- Tiles: a regular grid of ``tile_size`` squares every ``stride`` pixels from the top-left
  corner; a border strip narrower than a tile is not used. Tiles whose tissue fraction is below
  ``min_tissue_fraction`` are dropped. ``tile_size: null`` makes the whole image one tile.
- Resizing: Pillow ``BILINEAR``, which widens its kernel when shrinking (area-weighted, no
  aliasing), is used for every tile.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NamedTuple

import numpy as np
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from neuroblastoma_cnn.errors import DataError

logger = logging.getLogger(__name__)

#: Pillow formats accepted as image content, whatever the file's extension (JPEG includes MPO).
IMAGE_FORMATS = ("BMP", "DIB", "JPEG", "PNG", "TIFF")
#: One filter for every resize, so training and prediction tiles match pixel for pixel.
RESIZE_FILTER = Image.Resampling.BILINEAR
SYSTEM_FILES = frozenset(
    name.lower()
    for name in (
        "Thumbs.db", "ehthumbs.db", "desktop.ini", "Icon\r", "__MACOSX",
        "$RECYCLE.BIN", "System Volume Information", "lost+found",
    )
)

PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class Reason:
    """Stable prefixes of the reasons written to the rejected list (``"<prefix>: details"``)."""

    HIDDEN = "hidden or system file"
    OUTSIDE_CLASS = "not inside a class folder"
    TOO_DEEP = "folder nested too deep"
    EMPTY_CLASS = "empty class folder"
    EMPTY_PATIENT = "empty patient folder"
    NOT_IMAGE_EXTENSION = "not an image extension"
    NO_GROUP = "group_pattern does not match"
    EMPTY_FILE = "empty file"
    NOT_AN_IMAGE = "not a readable image"
    CORRUPT = "truncated or corrupt image"
    BOMB = "decompression bomb"
    UNSUPPORTED_MODE = "unsupported colour mode"
    TOO_SMALL = "too small"
    LABEL_CONFLICT = "label conflict"
    DUPLICATE = "duplicate"
    BACKGROUND = "mostly background"


class ImageRejected(DataError):
    """A file that cannot be used as an image; ``reason`` is what the rejected list shows."""

    def __init__(self, path: str | os.PathLike[str], reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"'{self.path}': {reason}")


class Tile(NamedTuple):
    """One tile: resized pixels, top-left corner at native resolution, tissue share."""

    tile: np.ndarray
    x: int
    y: int
    tissue_fraction: float


def is_hidden(name: str) -> bool:
    """Dotfiles (``.DS_Store``, ``._x.jpg``) and operating-system clutter such as Thumbs.db."""
    return name.startswith((".", "~$")) or name.lower() in SYSTEM_FILES


# ----------------------------------------------------------------------------- decoding


@contextmanager
def _own_bomb_check() -> Iterator[None]:
    """Turns off Pillow's global pixel limit: we apply ``max_image_pixels`` ourselves."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def decode_image(data: bytes, name: str, max_image_pixels: int) -> tuple[np.ndarray, str]:
    """Decodes image bytes into 8-bit RGB with EXIF orientation applied.

    Returns ``(rgb, source_mode)``; raises :class:`ImageRejected` with the reason otherwise.
    Works on bytes so that a file is read once for both its hash and its pixels.
    """
    if not data:
        raise ImageRejected(name, f"{Reason.EMPTY_FILE}: 0 bytes")
    with _own_bomb_check(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data": orientation handled below
        try:
            image = Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS))
        except Exception as exc:
            raise ImageRejected(
                name, f"{Reason.NOT_AN_IMAGE}: content is not a TIFF, PNG, JPEG or BMP image"
            ) from exc
        width, height = image.size
        if width * height > max_image_pixels:
            raise ImageRejected(
                name,
                f"{Reason.BOMB}: {width}x{height} = {width * height} pixels is more than "
                f"max_image_pixels = {max_image_pixels}",
            )
        try:
            image.load()
        except Exception as exc:
            raise ImageRejected(name, f"{Reason.CORRUPT}: {exc}") from exc
        mode = image.mode
        image = _apply_orientation(image, name)
        return to_rgb8(image, name), mode


def _apply_orientation(image: Image.Image, name: str) -> Image.Image:
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:
        logger.warning("'%s': unreadable EXIF data; orientation not applied", name)
        return image
    if orientation in (None, 1):
        return image
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        logger.warning("'%s': invalid EXIF orientation %r; not applied", name, orientation)
        return image


def to_rgb8(image: Image.Image, name: str = "image") -> np.ndarray:
    """Converts any Pillow image to a contiguous uint8 ``[H, W, 3]`` array.

    Transparency is composited on white (slide background), 16-bit values are scaled rather
    than clipped, so that a 16-bit scan looks like its 8-bit export.
    """
    mode = image.mode
    has_transparency = "transparency" in image.info and mode in ("P", "L", "RGB")
    if mode == "RGB" and not has_transparency:
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or has_transparency:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint16)
        alpha = rgba[..., 3:4]
        out = (rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255
        return np.ascontiguousarray(out.astype(np.uint8))
    if mode.startswith("I;16") or mode == "I":
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        gray = np.clip(np.nan_to_num(values) * scale, 0, 255).round().astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    try:
        return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    except (ValueError, OSError) as exc:
        raise ImageRejected(name, f"{Reason.UNSUPPORTED_MODE}: {mode}") from exc


class ImageChecks(BaseModel):
    """Which files count as images and how large they may be: one copy of the rules (and of
    their messages) for ingestion and prediction."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    extensions: Annotated[list[str], Field(min_length=1)]
    max_image_pixels: PositiveInt
    min_image_size: PositiveInt

    @property
    def normalised_extensions(self) -> frozenset[str]:
        return frozenset(
            (ext if ext.startswith(".") else f".{ext}").lower() for ext in self.extensions
        )

    def check_extension(self, name: str) -> None:
        """Raises :class:`ImageRejected` unless the file name has an image extension."""
        suffix = Path(name).suffix.lower()
        if suffix not in self.normalised_extensions:
            expected = ", ".join(sorted(self.normalised_extensions))
            raise ImageRejected(
                name, f"{Reason.NOT_IMAGE_EXTENSION}: '{suffix or '(none)'}' (expected {expected})"
            )

    def decode(self, data: bytes, name: str, tile_size: int | None) -> tuple[np.ndarray, str]:
        """Decodes and checks the size: ``(rgb, source_mode)`` or :class:`ImageRejected`.

        An image must be at least ``min_image_size`` a side and, with tiles, hold one tile.
        """
        rgb, mode = decode_image(data, name, self.max_image_pixels)
        height, width = rgb.shape[:2]
        smallest = max(self.min_image_size, tile_size or 0)
        if width < smallest or height < smallest:
            what = (f" for one tile: image is {width}x{height}, tile_size is {tile_size}"
                    if smallest == tile_size
                    else f": image is {width}x{height}, min_image_size is {self.min_image_size}")
            raise ImageRejected(name, f"{Reason.TOO_SMALL}{what}")
        return rgb, mode

    def read(self, path: str | os.PathLike[str], name: str, tile_size: int | None) -> np.ndarray:
        """Reads one file as ingestion would accept it (extension, content, size)."""
        self.check_extension(name)
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ImageRejected(name, f"{Reason.NOT_AN_IMAGE}: cannot read file ({exc})") from exc
        return self.decode(data, name, tile_size)[0]


# ----------------------------------------------------------------------------- tissue and tiles


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
    """How an image becomes model inputs: grid, tissue rule, threshold, resize. The only tiling
    API: ingestion, prediction and Grad-CAM all cut tiles through one of these."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    tile_size: PositiveInt | None
    stride: PositiveInt | None
    min_tissue_fraction: Fraction
    input_size: PositiveInt
    tissue_min_saturation: Annotated[float, Field(ge=0.0, lt=1.0)]
    tissue_white_level: Annotated[int, Field(ge=1, le=256)]

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

    def tissue_fraction(self, rgb: np.ndarray) -> float:
        """Share of tissue pixels in an RGB image or tile, in [0, 1]."""
        mask = tissue_mask(rgb, min_saturation=self.tissue_min_saturation,
                           white_level=self.tissue_white_level)
        return float(mask.mean()) if mask.size else 0.0

    def _windows(self, rgb: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        height, width = rgb.shape[:2]
        size_x, size_y = self.footprint(width, height)
        for x, y in self.positions(width, height):
            yield x, y, rgb[y : y + size_y, x : x + size_x]

    def score(self, rgb: np.ndarray) -> list[tuple[int, int, float]]:
        """``(x, y, tissue_fraction)`` of every grid tile, kept or not, without resizing."""
        return [(x, y, self.tissue_fraction(window)) for x, y, window in self._windows(rgb)]

    def iter_tiles(self, rgb: np.ndarray) -> Iterator[Tile]:
        """The kept tiles of one image, resized, one at a time."""
        for x, y, window in self._windows(rgb):
            fraction = self.tissue_fraction(window)
            if fraction >= self.min_tissue_fraction:
                yield Tile(resize_tile(window, self.input_size), x, y, fraction)

    def tile(self, rgb: np.ndarray) -> list[Tile]:
        """Every kept tile of one image (what training saw for an image like this one)."""
        return list(self.iter_tiles(rgb))

    def tiles_or_fallback(self, rgb: np.ndarray, fallback_tiles: int) -> tuple[list[Tile], bool]:
        """The kept tiles; if none, the ``fallback_tiles`` with the most tissue (in grid order).

        Returns ``(tiles, mostly_background)``: a prediction for an image with little tissue
        is still made, but flagged.
        """
        kept = self.tile(rgb)
        if kept:
            return kept, False
        height, width = rgb.shape[:2]
        size_x, size_y = self.footprint(width, height)
        best = sorted(self.score(rgb), key=lambda s: (-s[2], s[1], s[0]))[:fallback_tiles]
        best.sort(key=lambda s: (s[1], s[0]))
        return [
            Tile(resize_tile(rgb[y : y + size_y, x : x + size_x], self.input_size), x, y, f)
            for x, y, f in best
        ], True
