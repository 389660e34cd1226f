"""Whole-slide images: read lazily, region by region, never decoded whole.

A 40x slide (100,000 x 80,000 px) is ~24 GB of pixels, so slides do not go through
:func:`~.decoding.decode_image`: a :class:`Slide` reads only the regions asked
for, from the pyramid level that has just enough pixels. Ingestion and prediction both cut a
slide's tiles here, with the same :class:`~.decoding.TilingConfig` that crops use.

Decisions:

- Backends: OpenSlide when the ``openslide`` module imports and recognises the file, else
  ``tiffslide`` (pure Python: SVS and pyramidal TIFF). Both sit behind :class:`Slide`, and the
  tests read the same slides with both (same pixels). ``NEUROBLASTOMA_CNN_SLIDE_READER``
  (``auto``, ``openslide``, ``tiffslide``) forces one, e.g. to compare them or to step around
  one that misreads a file.
- What is a slide: a file with a slide extension (``.svs``, ``.ndpi``...), or a TIFF that is
  tiled and has more than one pyramid level. Any other TIFF is a crop, read as before.
- Tile size: ``tile_um`` (edge in microns) or ``target_mpp`` (``tile_size`` pixels counted at
  that resolution) need the slide's microns per pixel (its metadata, else
  ``slide_fallback_mpp``; else the slide is rejected, naming the file). Both null: ``tile_size``
  level-0 pixels, as for crops. Stride keeps the ratio ``stride / tile_size``.
- Tissue: the project's tissue rule on a low-resolution level (a tile spans about
  :data:`TISSUE_PIXELS_PER_TILE` pixels there), one strip of tiles at a time, so background is
  never read at full resolution. Kept tiles are read from the coarsest level that still has at
  least ``input_size`` pixels per tile edge, then resized as crops' tiles are.
- Coordinates (``x``, ``y``) are level-0 pixels, whatever level a tile was read from.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from neuroblastoma_cnn.core.errors import ParameterError
from neuroblastoma_cnn.images.decoding import (
    ImageRejected,
    Reason,
    Tile,
    TilingConfig,
    reduce_rgb,
    resize_tile,
    to_rgb8,
)

logger = logging.getLogger(__name__)

#: Extensions that are always slides (vendor formats); TIFFs are slides when pyramidal.
SLIDE_EXTENSIONS = frozenset({".svs", ".ndpi", ".scn", ".mrxs", ".vms", ".vmu", ".bif"})
TIFF_EXTENSIONS = frozenset({".tif", ".tiff"})
#: Pixels per tile edge on the level the tissue rule runs on (32 x 32 = 1024 samples per tile).
TISSUE_PIXELS_PER_TILE = 32
#: Widest strip (level pixels) read at once for tissue detection or a row of tiles.
STRIP_PIXELS = 4096
#: Largest strip (bytes of RGB) read at once for a thumbnail.
STRIP_BYTES = 64 << 20
#: The environment variable choosing the slide reader, and its values.
READER_VARIABLE = "NEUROBLASTOMA_CNN_SLIDE_READER"
READERS = ("auto", "openslide", "tiffslide")


def is_slide(path: str | os.PathLike[str]) -> bool:
    """True for a slide extension, or a tiled TIFF with several pyramid levels (headers only)."""
    suffix = Path(path).suffix.lower()
    if suffix in SLIDE_EXTENSIONS:
        return True
    if suffix not in TIFF_EXTENSIONS:
        return False
    try:
        import tifffile  # noqa: PLC0415  (only when a TIFF is met)

        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            return bool(page.is_tiled) and len(tif.series[0].levels) > 1
    except Exception:  # unreadable: not a slide; the image decoder says why
        return False


class Slide:
    """One open slide: level sizes, resolution, and regions as uint8 RGB arrays.

    The one interface over OpenSlide and tiffslide (their ``read_region`` differs: RGBA PIL vs
    array); coordinates are level-0 pixels, sizes level pixels, as in OpenSlide.
    """

    def __init__(self, handle: Any, backend: str, name: str):
        self._handle, self.backend, self.name = handle, backend, name
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(
            (int(w), int(h)) for w, h in handle.level_dimensions)
        self.level_downsamples: tuple[float, ...] = tuple(
            float(d) for d in handle.level_downsamples)
        self.mpp = _mpp(handle.properties)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """The ``width x height`` region of ``level`` whose top-left is level-0 ``(x, y)``;
        :class:`ImageRejected` (corrupt) if the file cannot give it."""
        try:
            if self.backend == "tiffslide":
                region = self._handle.read_region((x, y), level, (width, height), as_array=True)
                if region.ndim == 3 and region.shape[2] == 3 and region.dtype == np.uint8:
                    return np.ascontiguousarray(region)
                return to_rgb8(Image.fromarray(np.asarray(region)), self.name)
            region = self._handle.read_region((x, y), level, (width, height))
            pixels = np.asarray(region)
            if region.mode == "RGBA" and pixels[..., 3].min() == 255:  # opaque: the usual case
                return np.ascontiguousarray(pixels[..., :3])
            return to_rgb8(region, self.name)
        except ImageRejected:
            raise
        except Exception as exc:
            raise ImageRejected(self.name, f"{Reason.CORRUPT}: level {level} region at "
                                           f"({x}, {y}) cannot be read ({exc})") from exc

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample is at most ``downsample`` (0 if none)."""
        fitting = [i for i, d in enumerate(self.level_downsamples) if d <= downsample + 1e-6]
        return max(fitting, key=lambda i: self.level_downsamples[i]) if fitting else 0

    def thumbnail(self, max_side: int) -> np.ndarray:
        """The whole slide at most ``max_side`` pixels a side, read strip by strip from the
        coarsest level that has enough pixels (memory: one strip, not the level)."""
        width, height = self.dimensions
        scale = min(1.0, max_side / max(width, height))
        out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
        level = self.best_level(1 / scale)
        level_w, level_h = self.level_dimensions[level]
        factor = max(1, int(min(level_w / out_w, level_h / out_h)))
        band = factor * max(1, STRIP_BYTES // (3 * level_w * factor))  # rows, whole blocks
        down = self.level_downsamples[level]
        parts = []
        for top in range(0, level_h, band):
            rows = min(band, level_h - top)
            strip = self.read_region(0, round(top * down), level, level_w, rows)
            parts.append(reduce_rgb(strip, factor))
        reduced = np.concatenate(parts)
        return np.asarray(Image.fromarray(reduced).resize((out_w, out_h),
                                                          Image.Resampling.BILINEAR))

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _mpp(properties: Any) -> float | None:
    """Level-0 microns per pixel from the slide's metadata (mean of x and y), None if absent."""
    values = []
    for axis in ("x", "y"):
        for prefix in ("openslide", "tiffslide"):
            raw = properties.get(f"{prefix}.mpp-{axis}")
            try:
                value = float(raw) if raw not in (None, "") else math.nan
            except (TypeError, ValueError):
                value = math.nan
            if math.isfinite(value) and value > 0:
                values.append(value)
                break
    return float(np.mean(values)) if len(values) == 2 else None


def slide_reader() -> str:
    """The reader asked for in :data:`READER_VARIABLE`: ``auto`` (default), ``openslide`` or
    ``tiffslide``; anything else is a :class:`ParameterError` naming the variable."""
    reader = os.environ.get(READER_VARIABLE, "auto").strip().lower() or "auto"
    if reader not in READERS:
        raise ParameterError(f"{READER_VARIABLE}={reader!r}: must be one of "
                             f"{', '.join(READERS)}")
    return reader


def open_slide(path: str | os.PathLike[str], name: str | None = None,
               reader: str | None = None) -> Slide:
    """Opens a slide with ``reader`` (default :func:`slide_reader`): ``auto`` takes OpenSlide if
    installed and it knows the format, else tiffslide; :class:`ImageRejected` naming the file
    when the reader(s) cannot."""
    name = name or str(path)
    reader = reader or slide_reader()
    if reader in ("auto", "openslide"):
        try:
            import openslide  # noqa: PLC0415  (optional)

            if openslide.OpenSlide.detect_format(str(path)):
                return Slide(openslide.OpenSlide(str(path)), "openslide", name)
            problem = "OpenSlide does not know its format"
        except ImportError:
            problem = "OpenSlide is not installed (pip install openslide-python openslide-bin)"
        except Exception as exc:
            problem = f"OpenSlide cannot open it ({exc})"
        if reader == "openslide":
            raise ImageRejected(name, f"{Reason.SLIDE_UNREADABLE}: {problem}")
        logger.debug("'%s': %s; trying tiffslide", name, problem)
    try:
        import tiffslide  # noqa: PLC0415

        return Slide(tiffslide.TiffSlide(str(path)), "tiffslide", name)
    except Exception as exc:
        raise ImageRejected(name, f"{Reason.SLIDE_UNREADABLE}: {type(exc).__name__}: "
                                  f"{exc}") from exc


# ----------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class SlideGrid:
    """Where a slide's tiles are (level-0 pixels) and which level they are read from."""

    side0: int  # tile edge, level-0 pixels
    step0: int  # stride, level-0 pixels
    mpp: float | None  # level-0 microns per pixel used (metadata or fallback)
    read_level: int
    read_side: int  # tile edge on read_level
    positions: tuple[tuple[int, int], ...]

    @property
    def tile_um(self) -> float | None:
        """A tile's edge in microns (None without a resolution)."""
        return None if self.mpp is None else self.mpp * self.side0


def slide_grid(slide: Slide, tiling: TilingConfig) -> SlideGrid:
    """The tile grid of a slide for ``tiling`` (pixel, ``tile_um`` or ``target_mpp`` sizes)."""
    physical = tiling.tile_um is not None or tiling.target_mpp is not None
    mpp = slide.mpp if slide.mpp is not None else tiling.slide_fallback_mpp
    if physical and mpp is None:
        raise ImageRejected(slide.name, (
            f"{Reason.NO_RESOLUTION}: the slide has no microns-per-pixel metadata and "
            "tile_um / target_mpp need one; set ingestion.slide_fallback_mpp"))
    if tiling.tile_um is not None:
        side0 = tiling.tile_um / mpp
    elif tiling.target_mpp is not None:
        side0 = tiling.tile_size * tiling.target_mpp / mpp
    elif tiling.tile_size is not None:
        side0 = float(tiling.tile_size)
    else:
        raise ImageRejected(slide.name, (
            f"{Reason.TOO_SMALL}: a slide cannot be one whole-image tile; set "
            "ingestion.tile_size or ingestion.tile_um"))
    ratio = (tiling.effective_stride / tiling.tile_size) if tiling.tile_size else 1.0
    side = max(1, round(side0))
    step = max(1, round(side0 * ratio))
    width, height = slide.dimensions
    positions = tuple((x, y) for y in range(0, height - side + 1, step)
                      for x in range(0, width - side + 1, step))
    if not positions:
        raise ImageRejected(slide.name, f"{Reason.TOO_SMALL} for one tile: slide is "
                                        f"{width}x{height}, a tile is {side} px")
    level = slide.best_level(side / tiling.input_size)
    read_side = max(1, round(side / slide.level_downsamples[level]))
    return SlideGrid(side, step, mpp if mpp is not None else slide.mpp, level, read_side,
                     positions)


def tissue_fractions(slide: Slide, grid: SlideGrid, tiling: TilingConfig) -> np.ndarray:
    """Tissue fraction of every grid tile, measured on a low-resolution level one strip of
    tiles at a time (the strips of a grid row are read once, then every tile counted). A strip
    holds neighbours only: a grid with gaps (the tiles inside an annotated slide's regions)
    reads its runs of tiles, not the background between them."""
    level = slide.best_level(grid.side0 / TISSUE_PIXELS_PER_TILE)
    down = slide.level_downsamples[level]
    level_w, level_h = slide.level_dimensions[level]
    side = max(1, round(grid.side0 / down))
    rows: dict[int, list[int]] = {}
    for i, (_, y) in enumerate(grid.positions):
        rows.setdefault(y, []).append(i)
    fractions = np.zeros(len(grid.positions))
    for y, members in rows.items():
        top = min(round(y / down), max(0, level_h - side))
        for chunk in _runs(grid, members, max(1, STRIP_PIXELS // side)):
            left = round(grid.positions[chunk[0]][0] / down)
            right = min(level_w, round(grid.positions[chunk[-1]][0] / down) + side)
            strip = slide.read_region(round(left * down), round(top * down), level,
                                      right - left, min(side, level_h - top))
            mask = tiling.tissue_mask(strip)
            for i in chunk:
                x0 = round(grid.positions[i][0] / down) - left
                window = mask[:, x0:x0 + side]
                fractions[i] = np.count_nonzero(window) / window.size if window.size else 0.0
    return fractions


def _runs(grid: SlideGrid, members: list[int], longest: int) -> Iterator[list[int]]:
    """``members`` (indices of one grid row, left to right) cut into runs of neighbours (one
    grid step apart), each at most ``longest`` tiles."""
    start = 0
    while start < len(members):
        end = start + 1
        while (end < len(members) and end - start < longest
               and grid.positions[members[end]][0] - grid.positions[members[end - 1]][0]
               == grid.step0):
            end += 1
        yield members[start:end]
        start = end


def read_tile(slide: Slide, grid: SlideGrid, x: int, y: int, input_size: int) -> np.ndarray:
    """One tile at level-0 ``(x, y)``, read from the grid's level and resized to the model's
    input (the same filter as crops' tiles)."""
    region = slide.read_region(x, y, grid.read_level, grid.read_side, grid.read_side)
    return resize_tile(region, input_size)


def chosen_tiles(fractions: np.ndarray, threshold: float, fallback: int | None
                 ) -> tuple[list[int], bool]:
    """Indices of the kept tiles (grid order); with none and ``fallback``, the ``fallback``
    with the most tissue. Returns ``(indices, mostly_background)``."""
    kept = [int(i) for i in np.flatnonzero(fractions >= threshold)]
    if kept or not fallback:
        return kept, False
    best = np.argsort(-fractions, kind="stable")[:fallback]
    return sorted(int(i) for i in best), True


def read_tiles(slide: Slide, grid: SlideGrid, positions: list[tuple[int, int]],
               input_size: int) -> Iterator[np.ndarray]:
    """The tiles at level-0 ``positions``, in order, resized. Neighbours on a grid row are read
    as one region (up to :data:`STRIP_PIXELS` wide): a compressed source tile is then decoded
    once rather than once per model tile, which a region-per-tile loop cannot avoid."""
    down = slide.level_downsamples[grid.read_level]
    longest = max(1, STRIP_PIXELS // grid.read_side)
    start = 0
    while start < len(positions):
        x0, y0 = positions[start]
        end = start + 1
        while (end < len(positions) and end - start < longest and positions[end][1] == y0
               and positions[end][0] - positions[end - 1][0] == grid.step0):
            end += 1
        left = round(x0 / down)
        width = round(positions[end - 1][0] / down) - left + grid.read_side
        strip = slide.read_region(x0, y0, grid.read_level, width, grid.read_side)
        for x, _ in positions[start:end]:
            offset = round(x / down) - left
            yield resize_tile(strip[:, offset:offset + grid.read_side], input_size)
        start = end


def iter_slide_tiles(slide: Slide, grid: SlideGrid, fractions: np.ndarray,
                     indices: list[int], input_size: int) -> Iterator[Tile]:
    """The chosen tiles (only these are read at full resolution), row neighbours together."""
    positions = [grid.positions[i] for i in indices]
    for i, (x, y), tile in zip(indices, positions,
                               read_tiles(slide, grid, positions, input_size), strict=True):
        yield Tile(tile, x, y, float(fractions[i]))
