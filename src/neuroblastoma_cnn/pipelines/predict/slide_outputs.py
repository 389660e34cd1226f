"""Pictures of whole-slide predictions (one PNG per slide each): the heatmap of each class's
tile probability over the slide thumbnail (0 = blue, 1 = red; background tiles uncovered,
dimmed; panels stacked for a wide slide, in a row for a tall one), and the Grad-CAM gallery of
the ``slide_gallery_tiles`` tiles most confident in the predicted class.

The tiles themselves (plan, chunks, ``share_<class>``) are ``serving/slide_tiles.py``'s.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from neuroblastoma_cnn.analysis.gradcam import overlay
from neuroblastoma_cnn.analysis.predictions import probability_column
from neuroblastoma_cnn.images.preprocessing import Preprocessing
from neuroblastoma_cnn.images.slides import open_slide
from neuroblastoma_cnn.params import PredictParams
from neuroblastoma_cnn.serving.slide_tiles import read_chunks, share_column

logger = logging.getLogger(__name__)

HEATMAP_SUFFIX = ".heatmap"


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
        pixels = np.concatenate(list(read_chunks(path, name, preprocessing, positions)))
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
