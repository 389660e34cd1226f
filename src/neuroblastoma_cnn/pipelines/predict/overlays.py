"""Grad-CAM overlays and slide heatmaps of predicted files, drawn lazily when saved.

Kept apart from ``nodes.py``: drawing (decode again, heatmap, caption) is independent of
classifying, and only runs when ``predict.gradcam`` is on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from neuroblastoma_cnn.analysis.gradcam import GradCam, image_gradcam, overlay
from neuroblastoma_cnn.analysis.predictions import (
    probability_column,
)
from neuroblastoma_cnn.core.errors import DataError
from neuroblastoma_cnn.images.decoding import Decoded, decode_scaled
from neuroblastoma_cnn.images.preprocessing import Preprocessing, preprocessing_of
from neuroblastoma_cnn.images.slides import is_slide
from neuroblastoma_cnn.images.stain import normalise_tiles
from neuroblastoma_cnn.models import families
from neuroblastoma_cnn.models.families import Capability
from neuroblastoma_cnn.params import PredictParams
from neuroblastoma_cnn.serving.tiles import model_source

from .slide_outputs import (
    HEATMAP_SUFFIX,
    draw_gallery,
    draw_heatmap,
)

#: Logged under the node module's name, as before the split (log filters and readers see it).
logger = logging.getLogger("neuroblastoma_cnn.pipelines.predict.nodes")


OVERLAY_SUFFIX = ".png"


def overlay_name(file: str) -> str:
    """A relative ``.png`` name for a file's overlay (``a/b.jpg`` -> ``a/b.jpg.png``)."""
    parts = [p if p != ".." else "__" for p in PurePosixPath(str(file).replace("\\", "/")).parts
             if p not in ("/", ".")]
    parts = [p.replace(":", "_") for p in parts] or ["image"]
    return "/".join(parts) + OVERLAY_SUFFIX


def gradcam_overlays(
    files: Iterable[tuple[str, Path]],
    model: Any,
    predictions: pd.DataFrame,
    params: PredictParams,
    tiles: pd.DataFrame | None = None,
) -> dict[str, Callable[[], Any]]:
    """``{file: callable}`` drawing each predicted image with the Grad-CAM heatmap of its
    predicted class (a PIL image); each callable decodes its image only when called (lazy
    saving), and returns None (logged) if the image cannot be drawn. Empty when ``gradcam`` is
    off. Save each picture as :func:`overlay_name` of its file. A slide gets the gallery of
    its most confident tiles (from ``tiles``, the tile predictions) instead of a whole overlay."""
    settings = params
    if not settings.gradcam:
        logger.info("Grad-CAM overlays off (predict.gradcam: false)")
        return {}
    family = getattr(model, "family", None)  # a classifier that is not the CNN alone says which
    if family is not None and not families.family(family).able(Capability.GRADCAM):
        logger.info("Grad-CAM overlays not drawn for %s: %s", model_source(model),
                    families.family(family).cannot)
        return {}
    preprocessing = preprocessing_of(model)
    paths = dict(files)
    cam: Any = GradCam(model, batch_size=settings.batch_size)
    if preprocessing.stain_reference:
        cam = _StainedCam(cam, preprocessing.stain_reference)
    jobs: dict[str, Callable[[], Any]] = {}
    for row in predictions[~predictions["rejected"].astype(bool)].to_dict("records"):
        if row["file"] not in paths:
            raise DataError(f"'{row['file']}' is in the predictions but not among the files.")
        path = paths[row["file"]]
        if is_slide(path):
            if tiles is not None:
                plain = cam._cam if isinstance(cam, _StainedCam) else cam  # tiles normalised
                jobs[row["file"]] = partial(draw_gallery, path, row, _tiles_of(tiles, row),
                                            plain, preprocessing, settings)
            continue
        jobs[row["file"]] = partial(_draw_overlay, path, row, cam, preprocessing, settings)
    return jobs


def _tiles_of(tiles: pd.DataFrame, row: Mapping[str, Any]) -> pd.DataFrame:
    return tiles[tiles["file"].astype(str) == str(row["file"])]


def slide_heatmaps(
    files: Iterable[tuple[str, Path]], model: Any, predictions: pd.DataFrame,
    tiles: pd.DataFrame, params: PredictParams,
) -> dict[str, Callable[[], Any]]:
    """``{file: callable}`` drawing each predicted slide's class heatmaps (a PIL image, or
    None if it cannot be drawn); crops get none. Save as :func:`heatmap_name` of the file."""
    classes = list(preprocessing_of(model).classes)
    paths = dict(files)
    jobs: dict[str, Callable[[], Any]] = {}
    for row in predictions[~predictions["rejected"].astype(bool)].to_dict("records"):
        path = paths.get(row["file"])
        if path is not None and is_slide(path):
            jobs[row["file"]] = partial(draw_heatmap, path, row, _tiles_of(tiles, row),
                                        classes, params)
    return jobs


def heatmap_name(file: str) -> str:
    """``a/b.svs`` -> ``a/b.svs.heatmap.png``."""
    return overlay_name(file)[: -len(OVERLAY_SUFFIX)] + HEATMAP_SUFFIX + OVERLAY_SUFFIX


class _StainedCam:
    """A Grad-CAM whose tiles pass through the model's stain reference first, as in training."""

    def __init__(self, cam: GradCam, reference: Mapping[str, Any]):
        self._cam, self._reference = cam, reference

    def tile_maps(self, tiles: np.ndarray, class_index: int) -> Any:
        return self._cam.tile_maps(normalise_tiles(tiles, self._reference), class_index)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cam, name)


def _draw_overlay(
    path: Path, row: Mapping[str, Any], cam: Any, preprocessing: Preprocessing,
    settings: PredictParams,
) -> Any:
    name = str(row["file"])
    try:
        checks = preprocessing.image_checks
        data = checks.read_bytes(path, name)
        decoded = checks.decode_for(data, name, preprocessing.tiling)  # the predicted tiles
        side = settings.gradcam_max_side
        scale = min(1.0, side / max(decoded.height, decoded.width)) if side else 1.0
        class_index = preprocessing.classes.index(str(row["predicted"]))
        heat, covered = image_gradcam(cam, decoded, preprocessing.tiling, class_index,
                                      settings.background_fallback_tiles, scale)
        rgb = _display_pixels(data, name, decoded, heat.shape, checks.max_image_pixels)
        picture = overlay(rgb, heat, covered, alpha=settings.gradcam_alpha)
        return _with_caption(picture, _caption(row))
    except Exception as exc:
        logger.warning("No Grad-CAM overlay for '%s': %s", name, exc)
        return None


def _display_pixels(
    data: bytes, name: str, decoded: Decoded, shape: tuple[int, ...], max_image_pixels: int
) -> np.ndarray:
    """The picture under a heatmap of ``shape``: the tiling's decode if it has pixels enough,
    else the file decoded again at the largest power-of-two reduction that has them."""
    height, width = int(shape[0]), int(shape[1])
    rgb = decoded.rgb
    if rgb.shape[0] < height or rgb.shape[1] < width:
        factor = decoded.scale
        while factor > 1 and (decoded.width // factor < width
                              or decoded.height // factor < height):
            factor //= 2
        rgb = decode_scaled(data, name, max_image_pixels, lambda w, h: factor).rgb
    if rgb.shape[:2] != (height, width):
        rgb = np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR))
    return rgb


def _caption(row: Mapping[str, Any]) -> str:
    predicted = str(row["predicted"])
    text = f"{row['file']}: {predicted} ({float(row[probability_column(predicted)]):.2f})"
    flags = [flag.replace("_", " ") for flag in ("low_confidence", "mostly_background")
             if bool(row.get(flag))]
    return text + (f"  [{', '.join(flags)}]" if flags else "")


def _with_caption(picture: np.ndarray, text: str) -> Any:
    """The overlay under a white strip naming the file, the class and its probability."""
    width = picture.shape[1]
    size = int(np.clip(width / 60, 10, 28))
    try:
        font: Any = ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType
        font = ImageFont.load_default()
    strip = size + 10
    canvas = Image.new("RGB", (width, picture.shape[0] + strip), "white")
    canvas.paste(Image.fromarray(picture), (0, strip))
    ImageDraw.Draw(canvas).text((4, 4), text, fill="black", font=font)
    return canvas
