"""Ingestion: find every raw image, check it, and cut it into tissue tiles.

Everything here is a plain function that knows nothing of Kedro, because the prediction pipeline
must decode, tile and resize new images exactly like the training images: it calls
:func:`load_rgb` and :meth:`TilingConfig.tile` (or :func:`tile_image`) with the ingestion
parameters stored in the tile store's metadata.

Decisions (see also ``conf/base/parameters_ingestion.yml``):

- Decoding: only TIFF, PNG, JPEG and BMP content is accepted (whatever the extension says); the
  first frame of multi-page files is used; EXIF orientation is applied; every colour mode becomes
  8-bit RGB (alpha composited on white, 16-bit scaled by 255/65535, CMYK via Pillow). ICC
  profiles are not applied.
- Tissue: a pixel is tissue when its HSV saturation is above ``tissue_min_saturation`` (0.07) and
  it is not near-white (its darkest channel is below ``tissue_white_level``, 220). So bright
  glass, fat vacuoles and faintly tinted background are not tissue, nor are grey or black
  pixels (slide borders, pen marks, debris).
- Tiles: a regular grid of ``tile_size`` squares every ``stride`` pixels from the top-left
  corner; a border strip narrower than a tile is not used. Tiles whose tissue fraction is below
  ``min_tissue_fraction`` are dropped. ``tile_size: null`` makes the whole image one tile.
- Resizing: Pillow ``BILINEAR``, which widens its kernel when shrinking (area-weighted, no
  aliasing), is used for every tile.
- Background-only images (no tile kept) stay in the manifest with ``n_tiles = 0`` (they are valid
  images) and are also listed in the rejected list, because they give no training tile.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from neuroblastoma_cnn.datasets import TileStream

logger = logging.getLogger(__name__)

#: Pillow formats accepted as image content, whatever the file's extension (JPEG includes MPO).
IMAGE_FORMATS = ("BMP", "DIB", "JPEG", "PNG", "TIFF")
#: One filter for every resize, so training and prediction tiles match pixel for pixel.
RESIZE_FILTER = Image.Resampling.BILINEAR
DEFAULT_MIN_SATURATION = 0.07
DEFAULT_WHITE_LEVEL = 220
SYSTEM_FILES = frozenset(
    name.lower()
    for name in (
        "Thumbs.db", "ehthumbs.db", "desktop.ini", "Icon\r", "__MACOSX",
        "$RECYCLE.BIN", "System Volume Information", "lost+found",
    )
)
MANIFEST_COLUMNS = [
    "image_path", "label", "group", "width", "height", "mode", "sha256", "bytes",
    "n_tiles", "n_tiles_background", "max_tissue_fraction",
]
REJECTED_COLUMNS = ["file", "reason"]
LAYOUT_HINT = "<CLASS>/<file> or <CLASS>/<PATIENT>/<file>"


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


class ImageRejected(ValueError):
    """A file that cannot be used as an image; ``reason`` is what the rejected list shows."""

    def __init__(self, path: str | os.PathLike[str], reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"'{self.path}': {reason}")


class NoUsableImagesError(ValueError):
    """Raised when a raw folder yields nothing to train on; says what was expected and where."""


class RawDataChangedError(ValueError):
    """Raised when a raw file no longer matches the manifest it was listed in."""


class Tile(NamedTuple):
    """One kept tile: resized pixels, top-left corner at native resolution, tissue share."""

    tile: np.ndarray
    x: int
    y: int
    tissue_fraction: float


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


def load_rgb(path: str | os.PathLike[str], max_image_pixels: int = 250_000_000) -> np.ndarray:
    """Reads one image file as 8-bit RGB exactly as ingestion does (for prediction too)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageRejected(path, f"{Reason.NOT_AN_IMAGE}: cannot read file ({exc})") from exc
    return decode_image(data, str(path), max_image_pixels)[0]


# ----------------------------------------------------------------------------- tissue and tiles


def tissue_mask(
    rgb: np.ndarray,
    *,
    min_saturation: float = DEFAULT_MIN_SATURATION,
    white_level: int = DEFAULT_WHITE_LEVEL,
) -> np.ndarray:
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


def tissue_fraction(
    rgb: np.ndarray,
    *,
    min_saturation: float = DEFAULT_MIN_SATURATION,
    white_level: int = DEFAULT_WHITE_LEVEL,
) -> float:
    """Share of tissue pixels (see :func:`tissue_mask`) in an RGB image or tile, in [0, 1]."""
    mask = tissue_mask(rgb, min_saturation=min_saturation, white_level=white_level)
    return float(mask.mean()) if mask.size else 0.0


def tile_positions(
    width: int, height: int, tile_size: int | None, stride: int | None = None
) -> list[tuple[int, int]]:
    """Top-left corners ``(x, y)`` of the tile grid, row by row; empty if no tile fits."""
    if tile_size is None:
        return [(0, 0)]
    step = stride or tile_size
    return [
        (x, y)
        for y in range(0, height - tile_size + 1, step)
        for x in range(0, width - tile_size + 1, step)
    ]


def resize_tile(tile: np.ndarray, input_size: int) -> np.ndarray:
    """Resizes a uint8 RGB tile to ``input_size`` squared with the project's one filter."""
    if tile.shape[0] == input_size and tile.shape[1] == input_size:
        return np.ascontiguousarray(tile)
    resized = Image.fromarray(np.ascontiguousarray(tile)).resize(
        (input_size, input_size), RESIZE_FILTER
    )
    return np.asarray(resized, dtype=np.uint8)


def score_tiles(
    rgb: np.ndarray,
    tile_size: int | None,
    stride: int | None,
    *,
    min_saturation: float = DEFAULT_MIN_SATURATION,
    white_level: int = DEFAULT_WHITE_LEVEL,
) -> list[tuple[int, int, float]]:
    """``(x, y, tissue_fraction)`` of every grid tile, kept or not, without resizing."""
    height, width = rgb.shape[:2]
    size_x, size_y = (width, height) if tile_size is None else (tile_size, tile_size)
    return [
        (
            x,
            y,
            tissue_fraction(
                rgb[y : y + size_y, x : x + size_x],
                min_saturation=min_saturation,
                white_level=white_level,
            ),
        )
        for x, y in tile_positions(width, height, tile_size, stride)
    ]


def iter_tiles(
    rgb: np.ndarray,
    tile_size: int | None,
    stride: int | None,
    min_tissue_fraction: float,
    input_size: int,
    *,
    min_saturation: float = DEFAULT_MIN_SATURATION,
    white_level: int = DEFAULT_WHITE_LEVEL,
) -> Iterator[Tile]:
    """Yields the kept tiles of one image, resized, one at a time (see :func:`tile_image`)."""
    height, width = rgb.shape[:2]
    size_x, size_y = (width, height) if tile_size is None else (tile_size, tile_size)
    for x, y in tile_positions(width, height, tile_size, stride):
        window = rgb[y : y + size_y, x : x + size_x]
        fraction = tissue_fraction(window, min_saturation=min_saturation, white_level=white_level)
        if fraction >= min_tissue_fraction:
            yield Tile(resize_tile(window, input_size), x, y, fraction)


def tile_image(
    rgb: np.ndarray,
    tile_size: int | None,
    stride: int | None,
    min_tissue_fraction: float,
    input_size: int,
    *,
    min_saturation: float = DEFAULT_MIN_SATURATION,
    white_level: int = DEFAULT_WHITE_LEVEL,
) -> list[Tile]:
    """Cuts an RGB image into tissue tiles: ``[(tile_uint8, x, y, tissue_fraction), ...]``.

    ``x``/``y`` are the tile's top-left corner at native resolution; tiles whose tissue
    fraction is below ``min_tissue_fraction`` are dropped; kept tiles are resized to
    ``input_size`` squared. ``tile_size=None`` makes the whole image a single tile.
    """
    return list(
        iter_tiles(
            rgb, tile_size, stride, min_tissue_fraction, input_size,
            min_saturation=min_saturation, white_level=white_level,
        )
    )


@dataclass(frozen=True)
class TilingConfig:
    """The tiling settings, validated once; build it from the ingestion parameters."""

    tile_size: int | None = None
    stride: int | None = None
    min_tissue_fraction: float = 0.25
    input_size: int = 224
    tissue_min_saturation: float = DEFAULT_MIN_SATURATION
    tissue_white_level: int = DEFAULT_WHITE_LEVEL

    def __post_init__(self) -> None:
        for key in ("tile_size", "stride"):
            value = getattr(self, key)
            if value is not None and (not _is_int(value) or value <= 0):
                raise ValueError(
                    f"ingestion.{key} must be a positive integer or null, got {value!r}"
                )
        if not _is_int(self.input_size) or self.input_size <= 0:
            raise ValueError(
                f"ingestion.input_size must be a positive integer, got {self.input_size!r}"
            )
        if not 0.0 <= float(self.min_tissue_fraction) <= 1.0:
            raise ValueError(
                "ingestion.min_tissue_fraction must be within [0, 1], "
                f"got {self.min_tissue_fraction!r}"
            )
        if not 0.0 <= float(self.tissue_min_saturation) < 1.0:
            raise ValueError(
                "ingestion.tissue_min_saturation must be within [0, 1), "
                f"got {self.tissue_min_saturation!r}"
            )
        if not _is_int(self.tissue_white_level) or not 0 < self.tissue_white_level <= 256:
            raise ValueError(
                f"ingestion.tissue_white_level must be an integer in 1..256, "
                f"got {self.tissue_white_level!r}"
            )

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> TilingConfig:
        """Picks the tiling keys out of the ``ingestion`` parameters (extra keys ignored)."""
        defaults = cls()
        values = {key: params.get(key, getattr(defaults, key)) for key in asdict(defaults)}
        return cls(**values)

    @property
    def effective_stride(self) -> int | None:
        return None if self.tile_size is None else (self.stride or self.tile_size)

    def score(self, rgb: np.ndarray) -> list[tuple[int, int, float]]:
        return score_tiles(
            rgb, self.tile_size, self.stride,
            min_saturation=self.tissue_min_saturation, white_level=self.tissue_white_level,
        )

    def iter_tiles(self, rgb: np.ndarray) -> Iterator[Tile]:
        return iter_tiles(
            rgb, self.tile_size, self.stride, self.min_tissue_fraction, self.input_size,
            min_saturation=self.tissue_min_saturation, white_level=self.tissue_white_level,
        )

    def tile(self, rgb: np.ndarray) -> list[Tile]:
        """What prediction calls: the same tiles training saw for an image like this one."""
        return list(self.iter_tiles(rgb))


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- scanning


@dataclass(frozen=True)
class IngestionSettings:
    """Validated ingestion parameters that are not about tiling."""

    extensions: frozenset[str]
    group_pattern: re.Pattern[str] | None
    max_image_pixels: int
    min_image_size: int
    tiling: TilingConfig

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> IngestionSettings:
        extensions = params.get("extensions") or [".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp"]
        if isinstance(extensions, str):
            extensions = [extensions]
        normalised = frozenset(
            (ext if ext.startswith(".") else f".{ext}").lower() for ext in extensions
        )
        pattern = params.get("group_pattern")
        compiled = None
        if pattern:
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"ingestion.group_pattern {pattern!r} is not a valid regex: {exc}"
                ) from exc
            if "group" not in compiled.groupindex:
                raise ValueError(
                    f"ingestion.group_pattern {pattern!r} needs a named group 'group', "
                    r"e.g. '^(?P<group>[A-Z]+\d+)_'"
                )
        max_pixels = params.get("max_image_pixels", 250_000_000)
        min_size = params.get("min_image_size", 1)
        for key, value in (("max_image_pixels", max_pixels), ("min_image_size", min_size)):
            if not _is_int(value) or value <= 0:
                raise ValueError(f"ingestion.{key} must be a positive integer, got {value!r}")
        return cls(normalised, compiled, int(max_pixels), int(min_size),
                   TilingConfig.from_params(params))


@dataclass(frozen=True)
class Candidate:
    """A file with an image extension in the expected layout, not yet decoded."""

    path: Path
    rel: str
    label: str
    group: str


def is_hidden(name: str) -> bool:
    """Dotfiles (``.DS_Store``, ``._x.jpg``) and operating-system clutter such as Thumbs.db."""
    return name.startswith((".", "~$")) or name.lower() in SYSTEM_FILES


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    with os.scandir(folder) as it:
        return sorted(it, key=lambda entry: entry.name)


def scan_raw_folder(
    root: Path, settings: IngestionSettings
) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """Lists every entry under ``root``: image candidates, and rejections with their reason.

    Walks the tree itself (rather than globbing for images) so that hidden files, stray files,
    empty folders and wrong extensions are reported, not silently skipped.
    """
    scan = _Scan(settings)
    for entry in _entries(root):
        is_dir = entry.is_dir()
        if is_hidden(entry.name):
            scan.reject(entry.name + ("/" if is_dir else ""), Reason.HIDDEN)
        elif not is_dir:
            scan.reject(entry.name, f"{Reason.OUTSIDE_CLASS}: expected {LAYOUT_HINT}")
        else:
            scan.class_folder(Path(entry.path), entry.name)
    return scan.candidates, scan.rejected


@dataclass
class _Scan:
    settings: IngestionSettings
    candidates: list[Candidate] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)

    def reject(self, rel: str, reason: str) -> None:
        self.rejected.append((rel, reason))

    def class_folder(self, folder: Path, label: str) -> None:
        n_images = 0
        for entry in _entries(folder):
            rel = f"{label}/{entry.name}"
            is_dir = entry.is_dir()
            if is_hidden(entry.name):
                self.reject(rel + ("/" if is_dir else ""), Reason.HIDDEN)
            elif is_dir:
                n_images += self.patient_folder(Path(entry.path), label, entry.name)
            else:
                n_images += self.file(Path(entry.path), rel, label, None)
        if n_images == 0:
            self.reject(f"{label}/", f"{Reason.EMPTY_CLASS}: no image files")

    def patient_folder(self, folder: Path, label: str, patient: str) -> int:
        n_images = 0
        for entry in _entries(folder):
            rel = f"{label}/{patient}/{entry.name}"
            if is_hidden(entry.name):
                self.reject(rel + ("/" if entry.is_dir() else ""), Reason.HIDDEN)
            elif entry.is_dir():
                self.reject(f"{rel}/", f"{Reason.TOO_DEEP}: expected {LAYOUT_HINT}; not read")
            else:
                n_images += self.file(Path(entry.path), rel, label, patient)
        if n_images == 0:
            self.reject(f"{label}/{patient}/", f"{Reason.EMPTY_PATIENT}: no image files")
        return n_images

    def file(self, path: Path, rel: str, label: str, patient: str | None) -> int:
        """Adds a file as a candidate if its extension says image; 1 if it has one, else 0."""
        suffix = path.suffix.lower()
        if suffix not in self.settings.extensions:
            expected = ", ".join(sorted(self.settings.extensions))
            self.reject(
                rel, f"{Reason.NOT_IMAGE_EXTENSION}: '{suffix or '(none)'}' (expected {expected})"
            )
            return 0
        pattern = self.settings.group_pattern
        if patient is not None:
            group = patient
        elif pattern is not None:
            match = pattern.search(path.name)
            if not match or not match.group("group"):
                self.reject(rel, f"{Reason.NO_GROUP}: '{pattern.pattern}' finds no patient in "
                                 "the file name; add a patient folder or fix the pattern")
                return 1
            group = match.group("group")
        else:
            group = rel  # no patient information: each image is its own group
        self.candidates.append(Candidate(path, rel, label, group))
        return 1


# ----------------------------------------------------------------------------- manifest


def inspect_image(
    data: bytes, name: str, settings: IngestionSettings
) -> dict[str, Any]:
    """Decodes and checks one image; returns its manifest fields or raises ImageRejected."""
    rgb, mode = decode_image(data, name, settings.max_image_pixels)
    height, width = rgb.shape[:2]
    tiling = settings.tiling
    smallest = max(settings.min_image_size, tiling.tile_size or 0)
    if width < smallest or height < smallest:
        what = (f" for one tile: image is {width}x{height}, tile_size is {tiling.tile_size}"
                if smallest == tiling.tile_size
                else f": image is {width}x{height}, min_image_size is {settings.min_image_size}")
        raise ImageRejected(name, f"{Reason.TOO_SMALL}{what}")
    scores = tiling.score(rgb)
    kept = sum(fraction >= tiling.min_tissue_fraction for _, _, fraction in scores)
    return {
        "width": width,
        "height": height,
        "mode": mode,
        "n_tiles": kept,
        "n_tiles_background": len(scores) - kept,
        "max_tissue_fraction": round(max((f for _, _, f in scores), default=0.0), 4),
    }


def build_image_manifest(
    raw_root: str | os.PathLike[str], params: Mapping[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Checks every file under the raw folder; returns ``(manifest, rejected)``.

    The manifest has one row per usable image (``image_path, label, group, width, height,
    mode, sha256`` plus tile counts); the rejected list has ``file, reason`` for everything
    else. Files are read one at a time, and never written.
    """
    root = Path(raw_root)
    settings = IngestionSettings.from_params(params)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise NoUsableImagesError(
            f"Raw image folder '{root}' {what}. Expected images as '{root}/{LAYOUT_HINT}' "
            f"(extensions {', '.join(sorted(settings.extensions))})."
        )
    candidates, rejected = scan_raw_folder(root, settings)

    # Decode each distinct content once; copies share the result (and its rejection).
    by_hash: dict[str, list[Candidate]] = defaultdict(list)
    results: dict[str, dict[str, Any] | str] = {}
    sizes: dict[str, int] = {}
    for candidate in candidates:
        try:
            data = candidate.path.read_bytes()
        except OSError as exc:
            rejected.append((candidate.rel, f"{Reason.NOT_AN_IMAGE}: cannot read file ({exc})"))
            continue
        digest = hashlib.sha256(data).hexdigest()
        by_hash[digest].append(candidate)
        sizes[candidate.rel] = len(data)
        if digest not in results:
            try:
                results[digest] = inspect_image(data, candidate.rel, settings)
            except ImageRejected as exc:
                results[digest] = exc.reason
        del data

    rows: list[dict[str, Any]] = []
    for digest, copies in by_hash.items():
        result = results[digest]
        if isinstance(result, str):
            rejected.extend((c.rel, result) for c in copies)
            continue
        labels = sorted({c.label for c in copies})
        if len(labels) > 1:
            where = ", ".join(sorted(c.rel for c in copies))
            reason = (f"{Reason.LABEL_CONFLICT}: identical bytes under classes "
                      f"{', '.join(labels)} ({where}); all copies rejected")
            rejected.extend((c.rel, reason) for c in copies)
            continue
        kept, *others = sorted(copies, key=lambda c: c.rel)
        rejected.extend(
            (c.rel, f"{Reason.DUPLICATE}: identical bytes to '{kept.rel}' (that copy is kept)")
            for c in others
        )
        rows.append({"image_path": kept.rel, "label": kept.label, "group": kept.group,
                     "sha256": digest, "bytes": sizes[kept.rel], **result})

    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    manifest = manifest.sort_values("image_path", ignore_index=True)
    threshold = settings.tiling.min_tissue_fraction
    for row in manifest.itertuples():
        if row.n_tiles == 0:
            rejected.append((row.image_path, (
                f"{Reason.BACKGROUND}: no tile with tissue fraction >= {threshold} "
                f"(best {row.max_tissue_fraction:.2f}); kept in the manifest with n_tiles 0")))
    rejected_df = pd.DataFrame(sorted(rejected), columns=REJECTED_COLUMNS)

    _log_manifest_summary(root, manifest, rejected_df)
    if manifest.empty:
        raise NoUsableImagesError(_nothing_usable_message(root, settings, rejected_df))
    _warn_about_layout(manifest, settings)
    return manifest, rejected_df


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


def _log_manifest_summary(root: Path, manifest: pd.DataFrame, rejected: pd.DataFrame) -> None:
    accepted = manifest.groupby("label").size().to_dict() if not manifest.empty else {}
    by_class = Counter(str(f).split("/", 1)[0] for f in rejected["file"] if "/" in str(f))
    classes = sorted(set(accepted) | set(by_class))
    per_class = ", ".join(f"{c} {accepted.get(c, 0)}/{by_class.get(c, 0)}" for c in classes)
    logger.info(
        "Image manifest of '%s': %d images accepted, %d entries rejected; per class "
        "accepted/rejected: %s", root, len(manifest), len(rejected), per_class or "none",
    )
    if not rejected.empty:
        kinds = Counter(_reason_kind(r) for r in rejected["reason"])
        logger.warning(
            "Rejected %d entries (listed in 'rejected_images'): %s", len(rejected),
            ", ".join(f"{n} {kind}" for kind, n in kinds.most_common()),
        )
        for file, reason in rejected.head(20).itertuples(index=False):
            logger.debug("Rejected '%s': %s", file, reason)
    for label in classes:
        if label not in accepted and label in by_class:
            logger.warning("Class folder '%s' has no usable image; it is left out", label)
    if not manifest.empty:
        background = manifest.loc[manifest["n_tiles"] == 0, "image_path"].tolist()
        if background:
            logger.warning(
                "%d images have no tile with enough tissue; they stay in the manifest with "
                "n_tiles 0 but give no tile: %s%s", len(background), ", ".join(background[:10]),
                " ..." if len(background) > 10 else "",
            )
        logger.info(
            "Tiles expected: %d kept, %d dropped as background",
            int(manifest["n_tiles"].sum()), int(manifest["n_tiles_background"].sum()),
        )


def _nothing_usable_message(
    root: Path, settings: IngestionSettings, rejected: pd.DataFrame
) -> str:
    message = (
        f"No usable images in raw folder '{root}'. Expected TIFF, PNG, JPEG or BMP files "
        f"({', '.join(sorted(settings.extensions))}) as '{root}/{LAYOUT_HINT}'."
    )
    if rejected.empty:
        return message + " The folder is empty."
    examples = "; ".join(f"{f}: {r}" for f, r in rejected.head(10).itertuples(index=False))
    more = f" (and {len(rejected) - 10} more)" if len(rejected) > 10 else ""
    return f"{message} All {len(rejected)} entries were rejected: {examples}{more}"


def _warn_about_layout(manifest: pd.DataFrame, settings: IngestionSettings) -> None:
    if manifest["label"].nunique() < 2:
        logger.warning(
            "Only one class has usable images (%s); a classifier needs at least two",
            ", ".join(manifest["label"].unique()),
        )
    if settings.tiling.tile_size is None:
        ratio = manifest["width"] / manifest["height"]
        skewed = int(((ratio < 0.9) | (ratio > 1.1)).sum())
        if skewed:
            logger.warning(
                "%d images are not square; with tile_size null each is resized whole to "
                "%dx%d, which distorts it. Set ingestion.tile_size to cut square tiles.",
                skewed, settings.tiling.input_size, settings.tiling.input_size,
            )


# ----------------------------------------------------------------------------- tiles


def tile_images(
    raw_root: str | os.PathLike[str], manifest: pd.DataFrame, params: Mapping[str, Any]
) -> TileStream:
    """Returns a lazy stream of the kept tiles of every manifest image, for the tile store.

    Images are decoded one at a time while the store is written, so memory does not grow
    with the data set. Each tile carries ``image_path, label, group, x, y, tissue_fraction``.
    """
    root = Path(raw_root)
    settings = IngestionSettings.from_params(params)
    tiling = settings.tiling
    missing = {"image_path", "label", "group", "sha256"} - set(manifest.columns)
    if missing:
        raise ValueError(f"Image manifest lacks columns {sorted(missing)}; rebuild it.")
    images = manifest
    if "n_tiles" in manifest.columns:
        images = manifest[manifest["n_tiles"].astype(int) > 0]
    if images.empty:
        raise NoUsableImagesError(
            f"No image in '{root}' has a tile with tissue fraction >= "
            f"{tiling.min_tissue_fraction} (see 'rejected_images'); lower "
            "ingestion.min_tissue_fraction or check the images."
        )
    classes = sorted(str(label) for label in images["label"].unique())
    lost = sorted(set(map(str, manifest["label"])) - set(classes))
    if lost:
        logger.warning("Classes with images but no tissue tile, left out: %s", ", ".join(lost))
    rows = [
        (str(r.image_path), str(r.label), str(r.group), str(r.sha256))
        for r in images.itertuples(index=False)
    ]
    metadata = {
        "classes": classes,
        "input_size": tiling.input_size,
        "tile_size": tiling.tile_size,
        "stride": tiling.effective_stride,
        "min_tissue_fraction": tiling.min_tissue_fraction,
        "tissue_rule": (
            f"HSV saturation > {tiling.tissue_min_saturation} and darkest channel < "
            f"{tiling.tissue_white_level}"
        ),
        "resize_filter": RESIZE_FILTER.name.lower(),
        "n_images": len(rows),
        "ingestion": dict(params),
    }
    if params.get("shard_size"):
        metadata["shard_size"] = int(params["shard_size"])
    return TileStream(_tile_records(root, rows, settings), metadata)


def _tile_records(
    root: Path, rows: list[tuple[str, str, str, str]], settings: IngestionSettings
) -> Callable[[], Iterator[tuple[np.ndarray, dict[str, Any]]]]:
    def records() -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        kept: Counter[str] = Counter()
        dropped: Counter[str] = Counter()
        for image_path, label, group, sha256 in rows:
            path = root / PurePosixPath(image_path)
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise RawDataChangedError(
                    f"'{path}' is in the image manifest but cannot be read ({exc}); "
                    "rerun the ingestion pipeline."
                ) from exc
            if hashlib.sha256(data).hexdigest() != sha256:
                raise RawDataChangedError(
                    f"'{path}' changed since the image manifest was built (sha256 differs); "
                    "rerun the ingestion pipeline."
                )
            rgb, _ = decode_image(data, str(path), settings.max_image_pixels)
            del data
            n_kept = 0
            for tile in settings.tiling.iter_tiles(rgb):
                n_kept += 1
                yield tile.tile, {
                    "image_path": image_path, "label": label, "group": group,
                    "x": tile.x, "y": tile.y,
                    "tissue_fraction": round(tile.tissue_fraction, 4),
                }
            height, width = rgb.shape[:2]
            n_grid = len(tile_positions(width, height, settings.tiling.tile_size,
                                        settings.tiling.stride))
            kept[label] += n_kept
            dropped[label] += n_grid - n_kept
        logger.info(
            "Tiled %d images: %d tiles kept, %d dropped as background; per class kept/dropped: %s",
            len(rows), sum(kept.values()), sum(dropped.values()),
            ", ".join(f"{c} {kept[c]}/{dropped[c]}" for c in sorted(set(kept) | set(dropped))),
        )

    return records
