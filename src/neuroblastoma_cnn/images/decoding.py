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

The one import for all of it: this module decodes (bytes to RGB, at full or reduced scale) and
checks files (:class:`ImageChecks`), and re-exports the tile grid and tissue rule
(:mod:`.tiling`) and the reasons a file is rejected (:mod:`.rejection`).
"""

from __future__ import annotations

import io
import logging
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import numpy as np
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from neuroblastoma_cnn.core.types import PositiveInt
from neuroblastoma_cnn.images.rejection import SYSTEM_FILES, ImageRejected, Reason, is_hidden
from neuroblastoma_cnn.images.tiling import (
    RESIZE_FILTER,
    SLIDE_TILING_FIELDS,
    Decoded,
    Tile,
    TilingConfig,
    reduce_rgb,
    resize_tile,
    tissue_mask,
)

__all__ = [
    "DRAFT_FORMATS",
    "IMAGE_FORMATS",
    "PIXEL_LIMIT_PARAMETER",
    "RESIZE_FILTER",
    "SLIDE_TILING_FIELDS",
    "SYSTEM_FILES",
    "Decoded",
    "ImageChecks",
    "ImageRejected",
    "Reason",
    "Tile",
    "TilingConfig",
    "decode_image",
    "decode_scaled",
    "image_format",
    "is_hidden",
    "reduce_rgb",
    "resize_tile",
    "tissue_mask",
    "to_rgb8",
]

logger = logging.getLogger(__name__)

#: Pillow formats accepted as image content, whatever the file's extension (JPEG includes MPO).
IMAGE_FORMATS = ("BMP", "DIB", "JPEG", "PNG", "TIFF")
#: JPEG formats Pillow can decode at 1/2, 1/4 or 1/8 scale (draft mode).
DRAFT_FORMATS = ("JPEG", "MPO")


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


#: The parameter a decompression-bomb refusal names unless told another (prediction's own).
PIXEL_LIMIT_PARAMETER = "ingestion.max_image_pixels"


def image_format(data: bytes) -> str | None:
    """The image format the header of ``data`` declares (``PNG``, ``JPEG``...), or None.

    Reads the header only, under the same Pillow settings as decoding: Pillow's own bomb
    check raises ``DecompressionBombError`` (not an ``OSError``) on a huge declared size, which
    would otherwise escape a caller that only wants the format."""
    with _decoding_globals:
        try:
            with Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS)) as image:
                return str(image.format)
        except Exception:  # anything unreadable is simply not an image
            return None


def decode_image(data: bytes, name: str, max_image_pixels: int,
                 limit_name: str = PIXEL_LIMIT_PARAMETER) -> tuple[np.ndarray, str]:
    """Decodes image bytes into 8-bit RGB at native resolution, EXIF orientation applied.

    Returns ``(rgb, source_mode)``; raises :class:`ImageRejected` with the reason otherwise.
    Works on bytes so that a file is read once for both its hash and its pixels.
    """
    decoded = decode_scaled(data, name, max_image_pixels, _no_reduction, limit_name)
    return decoded.rgb, decoded.mode


def _no_reduction(width: int, height: int) -> int:
    return 1


def decode_scaled(
    data: bytes, name: str, max_image_pixels: int, reduction: Callable[[int, int], int],
    limit_name: str = PIXEL_LIMIT_PARAMETER,
) -> Decoded:
    """Decodes image bytes into 8-bit RGB at ``1/reduction(width, height)`` of the native size.

    ``reduction`` gets the native size from the header (a power of two; 1 = native). JPEG is
    decoded at reduced scale by libjpeg (draft mode), so fewer pixels are ever made; the rest of
    the reduction is a box average. The same bytes and reduction always give the same pixels.
    Raises :class:`ImageRejected` with the reason. The pixel limit is checked on the size the
    header declares, before a single pixel is decoded (``Image.open`` is lazy), so a few-KB
    file that declares 10^10 pixels costs no memory; ``limit_name`` is the parameter the
    refusal names (the fix).
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
                f"{limit_name} = {max_image_pixels} (refused before decoding; raise "
                f"{limit_name} if such images are expected)",
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

    def decode_for(self, data: bytes, name: str, tiling: TilingConfig,
                   limit_name: str = PIXEL_LIMIT_PARAMETER) -> Decoded:
        """Decodes as ``tiling`` records (full or reduced scale) and checks the native size."""
        decoded = decode_scaled(data, name, self.max_image_pixels, tiling.reduction, limit_name)
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

    def read_for(self, path: str | os.PathLike[str], name: str, tiling: TilingConfig,
                 limit_name: str = PIXEL_LIMIT_PARAMETER) -> Decoded:
        """Reads one file as ingestion decodes it for ``tiling`` (prediction, Grad-CAM)."""
        return self.decode_for(self.read_bytes(path, name), name, tiling, limit_name)
