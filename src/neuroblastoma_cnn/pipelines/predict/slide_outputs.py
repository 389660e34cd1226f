"""Prediction on whole-slide images: tiles streamed to the model, heatmaps, a Grad-CAM gallery.

A slide's tiles are cut by :mod:`neuroblastoma_cnn.images.slides` with the model's own tiling record
(pixels, or ``tile_um`` / ``target_mpp`` if the model was trained so) and read a chunk at a
time, so memory holds a few batches, never the slide. The slide-level class is the mean of its
tile probabilities (as for crops); ``share_<class>`` is the share of its tiles whose top class
is that class.

Pictures (one PNG per slide each): the heatmap of each class's tile probability over the
slide thumbnail (0 = blue, 1 = red; background tiles uncovered, dimmed; panels stacked for a
wide slide, in a row for a tall one), and the Grad-CAM
gallery of the ``slide_gallery_tiles`` tiles most confident in the predicted class.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from neuroblastoma_cnn.analysis.gradcam import overlay
from neuroblastoma_cnn.analysis.predictions import probability_column
from neuroblastoma_cnn.images.preprocessing import Preprocessing
from neuroblastoma_cnn.images.slides import (
    chosen_tiles,
    open_slide,
    read_tiles,
    slide_grid,
    tissue_fractions,
)
from neuroblastoma_cnn.images.stain import normalise_tiles
from neuroblastoma_cnn.params import PredictParams

logger = logging.getLogger(__name__)

HEATMAP_SUFFIX = ".heatmap"
SHARE_PREFIX = "share_"
#: Tiles read per chunk handed to the model (a multiple of nothing: the batcher re-batches).
CHUNK_TILES = 64


def share_column(label: str) -> str:
    return f"{SHARE_PREFIX}{label}"


@dataclass
class SlideTiles:
    """The plan of one slide's prediction, before any full-resolution pixel is read."""

    file: str
    width: int
    height: int
    level: int
    tile_px: int
    mpp: float | None
    positions: list[tuple[int, int]]
    fractions: list[float]
    mostly_background: bool
    chunks: Callable[[], Iterator[np.ndarray]]  # the chosen tiles, CHUNK_TILES at a time


def plan_slide(path: Path, name: str, preprocessing: Preprocessing,
               fallback_tiles: int) -> SlideTiles:
    """Opens a slide, finds its tissue tiles on a low-resolution level (the fallback tiles if
    none), and returns how to read them; :class:`ImageRejected` if it cannot be used."""
    tiling = preprocessing.tiling
    with open_slide(path, name) as slide:
        grid = slide_grid(slide, tiling)
        fractions = tissue_fractions(slide, grid, tiling)
        width, height = slide.dimensions
    indices, background = chosen_tiles(fractions, tiling.min_tissue_fraction, fallback_tiles)
    positions = [grid.positions[i] for i in indices]
    return SlideTiles(name, width, height, grid.read_level, grid.side0, grid.mpp, positions,
                      [float(fractions[i]) for i in indices], background,
                      partial(_read_chunks, path, name, preprocessing, positions))


def _read_chunks(path: Path, name: str, preprocessing: Preprocessing,
                 positions: list[tuple[int, int]]) -> Iterator[np.ndarray]:
    tiling = preprocessing.tiling
    with open_slide(path, name) as slide:
        grid = slide_grid(slide, tiling)
        tiles = read_tiles(slide, grid, positions, tiling.input_size)
        for start in range(0, len(positions), CHUNK_TILES):
            chunk = np.stack(list(islice(tiles, min(CHUNK_TILES, len(positions) - start))))
            yield normalise_tiles(chunk, preprocessing.stain_reference)


class LogProgress:
    """Logs ``message % (done, total, rate)`` every ``every_s`` seconds (pipeline runs; the
    command line shows a bar instead)."""

    def __init__(self, message: str, total: int, every_s: float = 10.0):
        self.message, self.total, self.done, self.every_s = message, total, 0, every_s
        self.started = self.last = time.perf_counter()

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            logger.info(self.message, self.done, self.total, self.done / (now - self.started))


def log_tile_progress(name: str, total: int) -> LogProgress:
    """A slide's progress over its tiles."""
    return LogProgress(f"Slide '{name}': %d/%d tiles (%.1f tiles/s)", total)


def add_shares(predictions: pd.DataFrame, tiles: pd.DataFrame, classes: list[str]) -> None:
    """``share_<class>`` columns: the share of each file's tiles whose top class it is."""
    columns = [probability_column(c) for c in classes]
    top = pd.Series(np.asarray(classes)[tiles[columns].to_numpy().argmax(axis=1)],
                    index=tiles.index) if len(tiles) else pd.Series(dtype=str)
    shares = (pd.crosstab(tiles["file"], top, normalize="index") if len(tiles)
              else pd.DataFrame()).reindex(columns=classes, fill_value=0.0)
    for label in classes:  # a class no tile voted for: 0, not missing
        predictions[share_column(label)] = predictions["file"].map(shares[label]).where(
            ~predictions["rejected"].astype(bool))


# ----------------------------------------------------------------------------- pictures


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType
        return ImageFont.load_default()


def _captioned(picture: np.ndarray, text: str) -> np.ndarray:
    size = int(np.clip(picture.shape[1] / 30, 10, 22))
    canvas = Image.new("RGB", (picture.shape[1], picture.shape[0] + size + 8), "white")
    canvas.paste(Image.fromarray(picture), (0, size + 8))
    ImageDraw.Draw(canvas).text((3, 3), text, fill="black", font=_font(size))
    return np.asarray(canvas)


def _side_by_side(panels: list[np.ndarray], gap: int = 6, vertical: bool = False
                  ) -> Image.Image:
    """Panels in a row (or a column: wide slides read better stacked)."""
    along, across = (0, 1) if vertical else (1, 0)
    size = [0, 0]
    size[along] = sum(p.shape[along] for p in panels) + gap * (len(panels) - 1)
    size[across] = max(p.shape[across] for p in panels)
    canvas = Image.new("RGB", (size[1], size[0]), "white")
    offset = 0
    for panel in panels:
        canvas.paste(Image.fromarray(panel), (0, offset) if vertical else (offset, 0))
        offset += panel.shape[along] + gap
    return canvas


def probability_heat(tiles: pd.DataFrame, column: str, scale: float,
                     shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(heat, covered)`` at thumbnail ``shape``: each tile's probability painted over its
    footprint (overlaps averaged), not rescaled, so colours compare across classes."""
    total = np.zeros(shape, np.float32)
    count = np.zeros(shape, np.float32)
    numbers = _numeric(tiles, ["x", "y", "tile_px", column])
    for x, y, side, p in numbers.itertuples(index=False):
        x0, y0 = round(x * scale), round(y * scale)
        x1, y1 = max(x0 + 1, round((x + side) * scale)), max(y0 + 1, round((y + side) * scale))
        total[y0:y1, x0:x1] += p
        count[y0:y1, x0:x1] += 1
    covered = count > 0
    return np.divide(total, count, out=np.zeros_like(total), where=covered), covered


def _numeric(tiles: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Columns as numbers: a tile table read back from CSV beside crops has empty cells."""
    return tiles[columns].apply(pd.to_numeric, errors="coerce")


def draw_heatmap(path: Path, row: Mapping[str, Any], tiles: pd.DataFrame,
                 classes: list[str], settings: PredictParams) -> Any:
    """The slide thumbnail, then one panel per class: its tile probabilities over the slide."""
    name = str(row["file"])
    try:
        with open_slide(path, name) as slide:
            thumb = slide.thumbnail(settings.slide_thumbnail_side)
            scale = thumb.shape[1] / slide.dimensions[0]
        panels = [_captioned(thumb, f"{name}: {row['predicted']} "
                                    f"({float(row[probability_column(row['predicted'])]):.2f})")]
        for label in classes:
            heat, covered = probability_heat(tiles, probability_column(label), scale,
                                             thumb.shape[:2])
            text = (f"{label}: mean {float(row[probability_column(label)]):.2f}, "
                    f"share {float(row[share_column(label)]):.2f}")
            panels.append(_captioned(overlay(thumb, heat, covered, alpha=0.6), text))
        return _side_by_side(panels, vertical=thumb.shape[1] > thumb.shape[0])
    except Exception as exc:
        logger.warning("No heatmap for '%s': %s", name, exc)
        return None


def draw_gallery(path: Path, row: Mapping[str, Any], tiles: pd.DataFrame, cam: Any,
                 preprocessing: Preprocessing, settings: PredictParams) -> Any:
    """Grad-CAM of the predicted class over the slide's most confident tiles, with where each
    tile is (level-0 ``x, y``) and its probability."""
    name = str(row["file"])
    try:
        label = str(row["predicted"])
        column = probability_column(label)
        best = _numeric(tiles, ["x", "y", column]).sort_values(
            column, ascending=False, kind="stable").head(settings.slide_gallery_tiles)
        positions = list(zip(best["x"].astype(int), best["y"].astype(int), strict=True))
        pixels = np.concatenate(list(_read_chunks(path, name, preprocessing, positions)))
        maps = cam.tile_maps(pixels, preprocessing.classes.index(label))
        size = preprocessing.tiling.input_size
        panels = []
        for tile, raw, (x, y), p in zip(pixels, maps, positions, best[column], strict=True):
            heat = np.asarray(Image.fromarray(np.asarray(raw, np.float32), mode="F").resize(
                (size, size), Image.Resampling.BILINEAR))
            heat = np.clip(heat / heat.max(), 0, 1) if heat.max() > 0 else np.zeros_like(heat)
            picture = overlay(tile, heat, None, alpha=settings.gradcam_alpha)
            panels.append(_captioned(picture, f"({x}, {y}) {p:.2f}"))
        return _side_by_side(panels)
    except Exception as exc:
        logger.warning("No Grad-CAM gallery for '%s': %s", name, exc)
        return None
