"""Ingestion: find every raw image, check it, and cut it into tissue tiles.

The nodes here walk the raw folder, report every file they cannot use, and stream the tiles of
the usable ones into the tile store. How an image is decoded, what counts as tissue and how
tiles are cut live in :mod:`neuroblastoma_cnn.images.decoding`, because prediction must treat
new images the same way; the tile store records those settings
(:class:`~neuroblastoma_cnn.images.preprocessing.Preprocessing`), and the trained model carries
them on.

Background-only images (no tile kept) stay in the manifest with ``n_tiles = 0`` (they are valid
images) and are also listed in the rejected list, because they give no training tile.

Both nodes decode images on ``workers`` processes (:func:`~neuroblastoma_cnn.runtime.parallel.
ordered_map`): results are consumed in file order, so the manifest and the tile store are the
same bytes as with one process, and only a few images are in flight at once, so memory does not
grow with the number of images.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from neuroblastoma_cnn.core.errors import DataError
from neuroblastoma_cnn.datasets import TileStream
from neuroblastoma_cnn.images.decoding import ImageRejected, decode_scaled
from neuroblastoma_cnn.images.preprocessing import Preprocessing
from neuroblastoma_cnn.images.slides import (
    chosen_tiles,
    iter_slide_tiles,
    open_slide,
    slide_grid,
    tissue_fractions,
)
from neuroblastoma_cnn.params import IngestionParams
from neuroblastoma_cnn.runtime.parallel import ordered_map, resolve_workers

from .annotated import (
    annotated_tiles,
    inspect_annotated,
    log_annotated,
)
from .manifest import (
    HASH_CHUNK,
    MANIFEST_COLUMNS,
    REJECTED_COLUMNS,
    SLIDE_MANIFEST_COLUMNS,
    RawDataChangedError,
    _inspect_file,
    _log_manifest_summary,
    _nothing_usable_message,
    _warn_about_layout,
    file_sha256,
    hashes_kept,
    inspect_image,
    inspect_slide,
    keep_hashes,
    manifest_rows,
    manifest_tables,
    read_verified,
)
from .scanning import LAYOUT_HINT, Candidate, scan_raw_folder, subset_per_class

logger = logging.getLogger(__name__)

#: The nodes, and what tests and other modules reach through this module (the folder scan is in
#: ``scanning``, the manifest's rules in ``manifest``).
__all__ = [
    "HASH_CHUNK", "LAYOUT_HINT", "MANIFEST_COLUMNS", "REJECTED_COLUMNS", "SLIDE_MANIFEST_COLUMNS",
    "Candidate", "NoUsableImagesError", "RawDataChangedError", "build_image_manifest",
    "file_sha256", "inspect_image", "inspect_slide", "scan_raw_folder", "subset_per_class",
    "tile_images",
]


class NoUsableImagesError(DataError):
    """Raised when a raw folder yields nothing to train on; says what was expected and where."""


# ----------------------------------------------------------------------------- manifest


def build_image_manifest(
    raw_root: str | os.PathLike[str], params: IngestionParams
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Checks every file under the raw folder; returns ``(manifest, rejected)``.

    The manifest has one row per usable image (``image_path, label, group, width, height,
    mode, sha256`` plus tile counts); the rejected list has ``file, reason`` for everything
    else. Files are read one at a time, and never written.
    """
    root = Path(raw_root)
    settings = params
    extensions = sorted(settings.image_checks.normalised_extensions)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise NoUsableImagesError(
            f"Raw image folder '{root}' {what}. Expected images as '{root}/{LAYOUT_HINT}' "
            f"(extensions {', '.join(extensions)})."
        )
    candidates, rejected = scan_raw_folder(root, settings)
    annotated = [c for c in candidates if c.annotations is not None]
    candidates = subset_per_class([c for c in candidates if c.annotations is None],
                                  settings.max_images_per_class, settings.subset_seed)
    rows = _inspected_rows(candidates, settings, rejected)
    rows += _annotated_rows(annotated, settings, rejected)
    manifest, rejected_df = manifest_tables(rows, settings.tiling.min_tissue_fraction, rejected)
    _log_manifest_summary(root, manifest, rejected_df)
    if manifest.empty:
        raise NoUsableImagesError(_nothing_usable_message(root, settings, rejected_df))
    _warn_about_layout(manifest, settings)
    return manifest, rejected_df


def _inspected_rows(candidates: list[Candidate], settings: IngestionParams,
                    rejected: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Manifest rows of the images and slides in class folders (copies of one content share the
    first copy's result, and its rejection)."""
    by_hash: dict[str, list[Candidate]] = defaultdict(list)
    results: dict[str, dict[str, Any] | str] = {}
    sizes: dict[str, int] = {}
    inspected = ordered_map(partial(hashes_kept, partial(_inspect_file, settings)),
                            candidates, resolve_workers(settings.workers))
    with closing(inspected):
        for candidate, ((digest, size, result), hashed) in zip(candidates, inspected,
                                                               strict=True):
            keep_hashes(hashed)  # tiling checks a slide against its hash without reading it
            if digest is None:
                rejected.append((candidate.rel, str(result)))
                continue
            by_hash[digest].append(candidate)
            sizes[candidate.rel] = size
            results.setdefault(digest, result)
    return manifest_rows(by_hash, results, sizes, rejected)


def _annotated_rows(candidates: list[Candidate], settings: IngestionParams,
                    rejected: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Manifest rows of the annotated slides: one per usable region (see ``annotated``)."""
    inspected = ordered_map(partial(hashes_kept, partial(inspect_annotated, settings)),
                            candidates, resolve_workers(settings.workers))
    results = []
    with closing(inspected):
        for result, hashed in inspected:
            keep_hashes(hashed)
            results.append(result)
    log_annotated(results)
    for result in results:
        rejected.extend(result.rejected)
    return [row for result in results for row in result.rows]


# ----------------------------------------------------------------------------- tiles


def tile_images(
    raw_root: str | os.PathLike[str], manifest: pd.DataFrame, params: IngestionParams
) -> TileStream:
    """Returns a lazy stream of the kept tiles of every manifest image, for the tile store.

    Images are decoded one at a time while the store is written, so memory does not grow
    with the data set. Each tile carries ``image_path, label, group, x, y, tissue_fraction``.
    """
    root = Path(raw_root)
    tiling = params.tiling
    missing = {"image_path", "label", "group", "sha256"} - set(manifest.columns)
    if missing:
        raise DataError(f"Image manifest lacks columns {sorted(missing)}; rebuild it.")
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
    record = Preprocessing(classes=classes, image_checks=params.image_checks, tiling=tiling,
                           architecture=None)
    metadata = {**record.to_dict(), "n_images": len(rows), "shard_size": params.shard_size}
    slides = (set(map(str, images.loc[images["slide"].astype(bool), "image_path"]))
              if "slide" in images.columns else set())
    return TileStream(_tile_records(root, rows, params, slides, _regions_by_slide(images)),
                      metadata)


def _regions_by_slide(images: pd.DataFrame) -> dict[str, list[dict[str, Any]]]:
    """Each annotated region's ``image_path`` -> the manifest rows of every region of its
    slide (a slide is tiled once, for all its regions)."""
    if "region" not in images.columns:
        return {}
    annotated = images[images["region"].notna() & (images["region"].astype(str) != "")]
    by_slide = {str(slide): frame.to_dict("records")
                for slide, frame in annotated.groupby("slide_path", sort=False)}
    return {str(row["image_path"]): rows for rows in by_slide.values() for row in rows}


@dataclass(frozen=True)
class _ImageTiles:
    """The kept tiles of one image (computed on a worker) and its grid size."""

    tiles: np.ndarray  # uint8 [n, input_size, input_size, 3]
    positions: list[tuple[int, int]]
    fractions: list[float]
    n_grid: int


def _tile_file(root: Path, settings: IngestionParams, slides: set[str],
               row: tuple[str, str, str, str]) -> _ImageTiles | None:
    """Reads, verifies and tiles one manifest image (on a worker process); None for a slide,
    whose tiles are streamed by :func:`_slide_tiles` instead (they may not fit in memory)."""
    image_path, _, _, sha256 = row
    if image_path in slides:
        return None
    path = root / PurePosixPath(image_path)
    data = read_verified(path, sha256, whole=True)
    tiling = settings.tiling
    decoded = decode_scaled(data, str(path), settings.max_image_pixels, tiling.reduction)
    del data
    kept = tiling.tile(decoded)
    size = tiling.input_size
    tiles = (np.stack([t.tile for t in kept]) if kept
             else np.zeros((0, size, size, 3), np.uint8))
    return _ImageTiles(tiles, [(t.x, t.y) for t in kept], [t.tissue_fraction for t in kept],
                       len(tiling.positions(decoded.width, decoded.height)))


def _slide_tiles(root: Path, settings: IngestionParams, row: tuple[str, str, str, str]
                 ) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """The kept tiles of one slide, read one at a time, each with its level-0 position, the
    level it was read from, its edge in level-0 pixels and the slide's microns per pixel."""
    image_path, label, group, sha256 = row
    path = root / PurePosixPath(image_path)
    read_verified(path, sha256, whole=False)
    tiling = settings.tiling
    try:
        with open_slide(path, str(path)) as slide:
            grid = slide_grid(slide, tiling)
            fractions = tissue_fractions(slide, grid, tiling)
            indices, _ = chosen_tiles(fractions, tiling.min_tissue_fraction, None)
            for tile in iter_slide_tiles(slide, grid, fractions, indices, tiling.input_size):
                yield tile.tile, {
                    "image_path": image_path, "label": label, "group": group,
                    "x": tile.x, "y": tile.y, "tissue_fraction": round(tile.tissue_fraction, 4),
                    "level": grid.read_level, "tile_px": grid.side0, "mpp": grid.mpp,
                }
    except ImageRejected as exc:  # it passed the manifest's checks: it changed or is damaged
        raise RawDataChangedError(f"{exc}; rerun the ingestion pipeline.") from exc


def _streamed(root: Path, settings: IngestionParams, row: tuple[str, str, str, str],
              regions: dict[str, list[dict[str, Any]]], done: set[str]
              ) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """A slide's tiles; an annotated slide's (all its regions) at its first region's row."""
    slide_rows = regions.get(row[0])
    if slide_rows is None:
        yield from _slide_tiles(root, settings, row)
    elif str(slide_rows[0]["slide_path"]) not in done:
        done.add(str(slide_rows[0]["slide_path"]))
        yield from annotated_tiles(root, settings, slide_rows)


def _tile_records(
    root: Path, rows: list[tuple[str, str, str, str]], settings: IngestionParams,
    slides: set[str], regions: dict[str, list[dict[str, Any]]],
) -> Callable[[], Iterator[tuple[np.ndarray, dict[str, Any]]]]:
    workers = resolve_workers(settings.workers)

    def records() -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        kept: Counter[str] = Counter()
        dropped: Counter[str] = Counter()
        done: set[str] = set()  # annotated slides already tiled
        tiled = ordered_map(partial(_tile_file, root, settings, slides), rows, workers)
        with closing(tiled):
            for row, image in zip(rows, tiled, strict=True):
                image_path, label, group, _ = row
                if image is None:  # a slide: streamed here, tile by tile
                    for record in _streamed(root, settings, row, regions, done):
                        kept[record[1]["label"]] += 1
                        yield record
                    continue
                for tile, (x, y), fraction in zip(image.tiles, image.positions, image.fractions,
                                                  strict=True):
                    yield tile, {
                        "image_path": image_path, "label": label, "group": group,
                        "x": x, "y": y, "tissue_fraction": round(fraction, 4),
                    }
                kept[label] += len(image.positions)
                dropped[label] += image.n_grid - len(image.positions)
        logger.info(
            "Tiled %d images on %d worker(s): %d tiles kept, %d dropped as background; per "
            "class kept/dropped: %s", len(rows), workers, sum(kept.values()),
            sum(dropped.values()),
            ", ".join(f"{c} {kept[c]}/{dropped[c]}" for c in sorted(set(kept) | set(dropped))),
        )

    return records
