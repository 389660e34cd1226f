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
- Decoding (``decoding``, recorded with the tiling): ``full`` decodes every pixel, computes
  the tissue rule at native resolution and resizes each tile. ``reduced`` decodes no more pixels
  than the model sees: the image is decoded at 1/r of its size, r the largest power of two that
  keeps a tile at least ``input_size`` pixels a side (and divides tile size and stride, so that
  every tile maps onto whole reduced pixels). JPEG is decoded at 1/2, 1/4 or 1/8 scale by
  libjpeg's DCT scaling (Pillow draft mode); whatever reduction remains (other formats, r > 8)
  is a box average (``Image.reduce``). The tissue rule and the tiles are then computed on the
  reduced image; tile positions stay in native pixels. A record without ``decoding`` predates
  the choice and means ``full``, so older models predict with the method they were trained on.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Literal, NamedTuple

import numpy as np
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, model_validator

from neuroblastoma_cnn.core.errors import DataError

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
PositiveFloat = Annotated[float, Field(gt=0.0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
DecodeMethod = Literal["full", "reduced"]
#: JPEG formats Pillow can decode at 1/2, 1/4 or 1/8 scale (draft mode).
DRAFT_FORMATS = ("JPEG", "MPO")
#: Tiling fields that only whole-slide images use (absent from older and crop-only records).
SLIDE_TILING_FIELDS = frozenset({"tile_um", "target_mpp", "slide_fallback_mpp"})


def _is_none(value: object) -> bool:
    return value is None


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
    SLIDE_UNREADABLE = "unreadable slide"
    NO_RESOLUTION = "no slide resolution"


class ImageRejected(DataError):
    """A file that cannot be used as an image; ``reason`` is what the rejected list shows."""

    def __init__(self, path: str | os.PathLike[str], reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"'{self.path}': {reason}")

    def __reduce__(self) -> tuple[type[ImageRejected], tuple[str, str]]:
        # Raised in worker processes too: pickled with both arguments, not the message alone.
        return type(self), (self.path, self.reason)


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


def is_hidden(name: str) -> bool:
    """Dotfiles (``.DS_Store``, ``._x.jpg``) and operating-system clutter such as Thumbs.db."""
    return name.startswith((".", "~$")) or name.lower() in SYSTEM_FILES


# ----------------------------------------------------------------------------- decoding


class _DecodingGlobals:
    """Pillow's global pixel limit off (we apply ``max_image_pixels`` ourselves) and warnings
    silenced (e.g. "Corrupt EXIF data": orientation is handled) while any image decodes.

    Both are process-wide state, and prediction decodes on several threads: entering and
    leaving ``catch_warnings`` per thread would restore another thread's state (leaving
    warnings off for good), so the first decode to start sets them and the last to end
    restores them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._previous_limit: int | None = None
        self._warnings: warnings.catch_warnings | None = None

    def __enter__(self) -> None:
        with self._lock:
            if self._active == 0:
                self._warnings = warnings.catch_warnings()
                self._warnings.__enter__()
                warnings.simplefilter("ignore")
                self._previous_limit = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
            self._active += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                Image.MAX_IMAGE_PIXELS = self._previous_limit
                if self._warnings is not None:
                    self._warnings.__exit__(None, None, None)
                self._warnings = None


_decoding_globals = _DecodingGlobals()


def decode_image(data: bytes, name: str, max_image_pixels: int) -> tuple[np.ndarray, str]:
    """Decodes image bytes into 8-bit RGB at native resolution, EXIF orientation applied.

    Returns ``(rgb, source_mode)``; raises :class:`ImageRejected` with the reason otherwise.
    Works on bytes so that a file is read once for both its hash and its pixels.
    """
    decoded = decode_scaled(data, name, max_image_pixels, _no_reduction)
    return decoded.rgb, decoded.mode


def _no_reduction(width: int, height: int) -> int:
    return 1


def decode_scaled(
    data: bytes, name: str, max_image_pixels: int, reduction: Callable[[int, int], int]
) -> Decoded:
    """Decodes image bytes into 8-bit RGB at ``1/reduction(width, height)`` of the native size.

    ``reduction`` gets the native size from the header (a power of two; 1 = native). JPEG is
    decoded at reduced scale by libjpeg (draft mode), so fewer pixels are ever made; the rest of
    the reduction is a box average. The same bytes and reduction always give the same pixels.
    Raises :class:`ImageRejected` with the reason.
    """
    if not data:
        raise ImageRejected(name, f"{Reason.EMPTY_FILE}: 0 bytes")
    with _decoding_globals:
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
        mode = image.mode
        factor = int(reduction(width, height))
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"reduction must be a power of two >= 1, got {factor}")
        done = _draft(image, factor, width, height)
        try:
            image.load()
        except Exception as exc:
            raise ImageRejected(name, f"{Reason.CORRUPT}: {exc}") from exc
        stored = image.size
        image = _apply_orientation(image, name)
        if image.size != stored and image.size == stored[::-1]:
            width, height = height, width  # a quarter turn: the native size turns too
        rgb = to_rgb8(image, name)
    if factor > done:
        rgb = reduce_rgb(rgb, factor // done)
    return Decoded(rgb, factor, width, height, mode)


def _draft(image: Image.Image, factor: int, width: int, height: int) -> int:
    """Asks a JPEG decoder for ``1/factor`` scale (at most 1/8); returns the scale it gives."""
    if factor == 1 or image.format not in DRAFT_FORMATS:
        return 1
    if width // factor < 1 or height // factor < 1:
        return 1  # smaller than the reduction: rejected as too small after decoding anyway
    result = image.draft(image.mode, (width // factor, height // factor))
    if result is None:
        return 1
    done = round(width / result[1][2])
    if done < 1 or factor % done or image.size != (-(-width // done), -(-height // done)):
        raise RuntimeError(f"JPEG draft gave scale 1/{done} for 1/{factor} ({image.size})")
    return done


def reduce_rgb(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Box-average reduction by an integer factor (a partial last block averages what it has),
    so that reduced pixel ``(i, j)`` covers native pixels ``factor*i .. factor*(i+1) - 1``."""
    if factor == 1:
        return rgb
    reduced = Image.fromarray(np.ascontiguousarray(rgb)).reduce(factor)
    return np.asarray(reduced, dtype=np.uint8)


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
        """Decodes at native resolution and checks the size: ``(rgb, source_mode)`` or
        :class:`ImageRejected`. An image must be at least ``min_image_size`` a side and, with
        tiles, hold one tile."""
        rgb, mode = decode_image(data, name, self.max_image_pixels)
        height, width = rgb.shape[:2]
        self._check_size(name, width, height, tile_size)
        return rgb, mode

    def decode_for(self, data: bytes, name: str, tiling: TilingConfig) -> Decoded:
        """Decodes as ``tiling`` records (full or reduced scale) and checks the native size."""
        decoded = decode_scaled(data, name, self.max_image_pixels, tiling.reduction)
        self._check_size(name, decoded.width, decoded.height, tiling.tile_size)
        return decoded

    def _check_size(self, name: str, width: int, height: int, tile_size: int | None) -> None:
        smallest = max(self.min_image_size, tile_size or 0)
        if width < smallest or height < smallest:
            what = (f" for one tile: image is {width}x{height}, tile_size is {tile_size}"
                    if smallest == tile_size
                    else f": image is {width}x{height}, min_image_size is {self.min_image_size}")
            raise ImageRejected(name, f"{Reason.TOO_SMALL}{what}")

    def read_bytes(self, path: str | os.PathLike[str], name: str) -> bytes:
        """A file's bytes if its extension says image; :class:`ImageRejected` otherwise."""
        self.check_extension(name)
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ImageRejected(name, f"{Reason.NOT_AN_IMAGE}: cannot read file ({exc})") from exc

    def read(self, path: str | os.PathLike[str], name: str, tile_size: int | None) -> np.ndarray:
        """Reads one file at native resolution as ingestion would accept it (extension,
        content, size)."""
        return self.decode(self.read_bytes(path, name), name, tile_size)[0]

    def read_for(self, path: str | os.PathLike[str], name: str, tiling: TilingConfig) -> Decoded:
        """Reads one file as ingestion decodes it for ``tiling`` (prediction, Grad-CAM)."""
        return self.decode_for(self.read_bytes(path, name), name, tiling)


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
    tissue_min_saturation: Annotated[float, Field(ge=0.0, lt=1.0)]
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
