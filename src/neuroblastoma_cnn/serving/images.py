"""One image prepared for prediction: listed, checked, decoded and tiled as in training.

What happens to a file before the model sees it (the rejections, the background fallback, the
threads that decode ahead), the same for the predict pipeline, the command line and the served
model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from neuroblastoma_cnn.images.decoding import (
    PIXEL_LIMIT_PARAMETER,
    Decoded,
    ImageRejected,
    TilingConfig,
    is_hidden,
)
from neuroblastoma_cnn.images.preprocessing import Preprocessing
from neuroblastoma_cnn.images.slides import is_slide
from neuroblastoma_cnn.images.stain import normalise_tiles
from neuroblastoma_cnn.params import PredictParams
from neuroblastoma_cnn.runtime.parallel import ordered_map

from .slide_tiles import SlideTiles, plan_slide

logger = logging.getLogger(__name__)


@dataclass
class PreparedImage:
    """The tiles of one image the model will see, with where they were cut."""

    file: str
    tiles: np.ndarray  # uint8 [n, s, s, 3]
    positions: list[tuple[int, int]]
    fractions: list[float]
    mostly_background: bool
    width: int
    height: int


@dataclass(frozen=True)
class Rejection:
    file: str
    reason: str


def list_image_files(root: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """``(name, path)`` of every file under ``root`` at any depth, ``name`` relative to ``root``
    (posix); a file ``root`` is itself. Hidden and system files are skipped, not rejected."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"'{root}' does not exist: put the images to classify there "
                                "(any sub-folders).")
    if root.is_file():
        return [(root.name, root)]
    found: list[tuple[str, Path]] = []
    skipped = 0
    for folder, dirs, names in os.walk(root):
        skipped += sum(is_hidden(d) for d in dirs)
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))
        for name in sorted(names):
            if is_hidden(name):
                skipped += 1
                continue
            path = Path(folder) / name
            found.append((path.relative_to(root).as_posix(), path))
    if skipped:
        logger.debug("Skipped %d hidden or system entries under '%s'", skipped, root)
    return sorted(found)


#: The prediction setting that can lower the model's own pixel limit (a service's operator).
PREDICT_PIXEL_LIMIT = "predict.max_image_pixels"


def bounded_checks(preprocessing: Preprocessing, max_image_pixels: int | None
                   ) -> tuple[Preprocessing, str]:
    """The model's record with the pixel limit prediction applies: the lower of the record's
    (``ingestion.max_image_pixels`` at training) and ``predict.max_image_pixels``; with the
    parameter a refusal names."""
    checks = preprocessing.image_checks
    if max_image_pixels is None or max_image_pixels >= checks.max_image_pixels:
        return preprocessing, f"the model's {PIXEL_LIMIT_PARAMETER} (or {PREDICT_PIXEL_LIMIT})"
    lowered = checks.model_copy(update={"max_image_pixels": max_image_pixels})
    return preprocessing.model_copy(update={"image_checks": lowered}), PREDICT_PIXEL_LIMIT


def decode_for_prediction(path: Path, name: str, preprocessing: Preprocessing,
                          limit_name: str = PIXEL_LIMIT_PARAMETER) -> Decoded:
    """Reads an image as ingestion did for the model's training images (the record's decoding
    scale); raises :class:`ImageRejected` for a file it would have rejected (extension,
    content, size: a declared size over the pixel limit before any pixel is decoded)."""
    return preprocessing.image_checks.read_for(path, name, preprocessing.tiling, limit_name)


def select_tiles(
    image: np.ndarray | Decoded, tiling: TilingConfig, fallback_tiles: int
) -> tuple[np.ndarray, list[tuple[int, int]], list[float], bool]:
    """The tiles training would keep; if none, the ``fallback_tiles`` with the most tissue.

    Returns ``(tiles, positions, tissue_fractions, mostly_background)``.
    """
    tiles, background = tiling.tiles_or_fallback(image, fallback_tiles)
    return (np.stack([t.tile for t in tiles]), [(t.x, t.y) for t in tiles],
            [t.tissue_fraction for t in tiles], background)


def prepare_image(
    path: Path, name: str, preprocessing: Preprocessing, fallback_tiles: int,
    limit_name: str = PIXEL_LIMIT_PARAMETER,
) -> PreparedImage:
    """Decodes and tiles one file exactly as training did; raises :class:`ImageRejected`."""
    decoded = decode_for_prediction(path, name, preprocessing, limit_name)
    tiles, positions, fractions, background = select_tiles(
        decoded, preprocessing.tiling, fallback_tiles
    )
    tiles = normalise_tiles(tiles, preprocessing.stain_reference)  # as in training, if at all
    return PreparedImage(name, tiles, positions, fractions, background, decoded.width,
                         decoded.height)


def _prepare_or_reject(
    name: str, path: Path, preprocessing: Preprocessing, fallback_tiles: int,
    limit_name: str = PIXEL_LIMIT_PARAMETER,
) -> PreparedImage | SlideTiles | Rejection:
    try:
        if is_slide(path):  # tissue found here; its tiles are read later, chunk by chunk
            return plan_slide(path, name, preprocessing, fallback_tiles)
        return prepare_image(path, name, preprocessing, fallback_tiles, limit_name)
    except ImageRejected as exc:
        return Rejection(name, exc.reason)
    except Exception as exc:  # one bad file never stops the others
        logger.debug("Unexpected error on '%s'", name, exc_info=True)
        return Rejection(name, f"unexpected error: {type(exc).__name__}: {exc}")


def _prepared_in_order(
    files: Sequence[tuple[str, Path]], preprocessing: Preprocessing, settings: PredictParams
) -> Iterator[PreparedImage | SlideTiles | Rejection]:
    """Prepares files on worker threads (decoding releases the GIL), yielding in input order
    with a bounded look-ahead so memory does not grow with the number of files."""
    bounded, limit_name = bounded_checks(preprocessing, settings.max_image_pixels)
    job = partial(_prepare_or_reject, preprocessing=bounded,
                  fallback_tiles=settings.background_fallback_tiles, limit_name=limit_name)
    return ordered_map(lambda item: job(*item), files, settings.workers, processes=False)
