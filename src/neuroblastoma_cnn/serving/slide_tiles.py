"""Whole-slide images to the model: a slide planned on a low-resolution level, its tissue tiles
read a chunk at a time, and the share of its tiles each class wins.

A slide's tiles are cut by :mod:`neuroblastoma_cnn.images.slides` with the model's own tiling
record (pixels, or ``tile_um`` / ``target_mpp`` if the model was trained so) and read a chunk at
a time, so memory holds a few batches, never the slide. The slide-level class is the mean of
its tile probabilities (as for crops); ``share_<class>`` is the share of its tiles whose top
class is that class. The pictures drawn from them (heatmaps, Grad-CAM galleries) are the
predict pipeline's (``pipelines/predict/slide_outputs.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd

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

logger = logging.getLogger(__name__)

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
                      partial(read_chunks, path, name, preprocessing, positions))


def read_chunks(path: Path, name: str, preprocessing: Preprocessing,
                 positions: list[tuple[int, int]]) -> Iterator[np.ndarray]:
    """The tiles at ``positions`` (level 0), ``CHUNK_TILES`` at a time, stain-normalised as
    the model's record says: for prediction and for the Grad-CAM gallery."""
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
