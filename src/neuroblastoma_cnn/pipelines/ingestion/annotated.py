"""Annotated slides: a slide and its regions (QuPath GeoJSON or ImageScope XML beside it) to
manifest rows, rejections and tiles.

Decisions:

- One manifest row per usable region: ``image_path`` is ``<slide>#<region id>`` (the unit that
  evaluation averages tiles over: the study's "images" were regions cropped in ImageScope),
  ``label`` the region's class, ``group`` the slide's (the slide itself unless
  ``group_pattern`` finds a patient in its name), with ``slide_path``, ``region``,
  ``annotations`` (and its SHA-256) and ``n_tiles_mixed`` (its tiles dropped because they lie in
  another class's region too).
- Everything about a region is decided here, in the manifest step: a refused region is a
  rejected-list line (``<annotation file>``, ``region refused: region '<id>': why``), a
  repaired one a WARNING, and a slide left with no usable region is rejected with the reason.
  Tiling reads the saved manifest and re-plans the slide the same way (checking both files'
  hashes), so nothing is written from a slide whose annotations changed in between.
- Tissue is measured (on a low-resolution level) only on tiles inside regions, and a kept tile
  must pass the tissue rule as well as ``min_region_fraction``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from neuroblastoma_cnn.images.annotations import Region, read_annotations
from neuroblastoma_cnn.images.decoding import ImageRejected, Reason
from neuroblastoma_cnn.images.regions import RegionTiles, tiles_in_regions, usable_regions
from neuroblastoma_cnn.images.slides import (
    Slide,
    SlideGrid,
    iter_slide_tiles,
    open_slide,
    slide_grid,
    tissue_fractions,
)
from neuroblastoma_cnn.params import IngestionParams

from .manifest import RawDataChangedError, file_sha256, read_verified
from .scanning import Candidate

#: Logged under the node module's name, as the rest of ingestion.
logger = logging.getLogger("neuroblastoma_cnn.pipelines.ingestion.nodes")

@dataclass
class SlideRegions:
    """A slide's regions on its grid: the tiles inside them, with their tissue fractions, and
    what was refused or repaired on the way."""

    grid: SlideGrid
    regions: list[Region]
    tiles: RegionTiles
    tissue: np.ndarray  # tissue fraction of each of tiles.indices
    refused: list[tuple[str, str]]
    repaired: list[tuple[str, str]]
    skipped: dict[str, int]


def plan_regions(slide: Slide, annotations: bytes, name: str, settings: IngestionParams
                 ) -> SlideRegions:
    """Reads the annotations, refuses what cannot be used, and finds each usable region's
    tiles (tissue measured on those only); :class:`ImageRejected` if a file cannot be read."""
    tiling = settings.tiling
    grid = slide_grid(slide, tiling)
    found = read_annotations(annotations, name, settings.imagescope_class)
    width, height = slide.dimensions
    regions, refused = usable_regions(found, width, height, settings.annotation_classes)
    tiles = tiles_in_regions(grid.positions, grid.side0, regions, settings.min_region_fraction)
    inside = replace(grid, positions=tuple(grid.positions[i] for i in tiles.indices))
    tissue = (tissue_fractions(slide, inside, tiling) if len(tiles.indices)
              else np.zeros(0))
    with_tiles = set(tiles.region.tolist())
    for i, region in enumerate(regions):
        if i not in with_tiles:
            refused.append((region.id, (
                f"no tile kept: none lies inside it by min_region_fraction "
                f"{settings.min_region_fraction} without lying in a region of another class too "
                f"(a tile is {grid.side0} px)")))
    return SlideRegions(grid, regions, tiles, tissue, refused, found.repaired,
                        dict(found.skipped))


@dataclass
class AnnotatedSlide:
    """What the manifest step found for one annotated slide (computed on a worker)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def inspect_annotated(settings: IngestionParams, candidate: Candidate) -> AnnotatedSlide:
    """One annotated slide's manifest rows (one per usable region) and rejections."""
    assert candidate.annotations is not None
    notes = AnnotatedSlide()
    where = candidate.annotations.name
    try:
        digest, size = file_sha256(candidate.path)
        data = candidate.annotations.read_bytes()
    except OSError as exc:
        notes.rejected.append((candidate.rel, f"{Reason.NOT_AN_IMAGE}: cannot read ({exc})"))
        return notes
    try:
        with open_slide(candidate.path, candidate.rel) as slide:
            plan = plan_regions(slide, data, where, settings)
            levels, (width, height) = len(slide.level_dimensions), slide.dimensions
    except ImageRejected as exc:
        culprit = where if exc.path == where else candidate.rel
        notes.rejected.append((culprit, exc.reason))
        if culprit == where:
            notes.rejected.append((candidate.rel, f"{Reason.NO_REGION}: its annotations "
                                                  f"'{where}' cannot be read"))
        return notes
    base = {"group": candidate.group, "width": width, "height": height, "mode": "RGB",
            "sha256": digest, "bytes": size, "slide": True, "mpp": plan.grid.mpp,
            "levels": levels, "tile_px": plan.grid.side0, "read_level": plan.grid.read_level,
            "slide_path": candidate.rel, "annotations": where,
            "annotations_sha256": hashlib.sha256(data).hexdigest()}
    _region_rows(plan, base, settings.tiling.min_tissue_fraction, notes)
    _report(plan, candidate.rel, where, notes)
    return notes


def _region_rows(plan: SlideRegions, base: dict[str, Any], threshold: float,
                 notes: AnnotatedSlide) -> None:
    tissue_ok = plan.tissue >= threshold
    for i, region in enumerate(plan.regions):
        mine = plan.tiles.region == i
        if not mine.any():
            continue
        notes.rows.append({
            **base, "image_path": f"{base['slide_path']}#{region.id}", "label": region.label,
            "n_tiles": int((mine & tissue_ok).sum()),
            "n_tiles_background": int((mine & ~tissue_ok).sum()),
            "max_tissue_fraction": round(float(plan.tissue[mine].max()), 4),
            "region": region.id, "n_tiles_mixed": int((plan.tiles.mixed_region == i).sum()),
        })


def _report(plan: SlideRegions, slide: str, where: str, notes: AnnotatedSlide) -> None:
    notes.rejected.extend((where, f"{Reason.REGION_REFUSED}: region '{region}': {why}")
                          for region, why in plan.refused)
    notes.warnings.extend(f"Annotations '{where}', region '{region}': {what}"
                          for region, what in plan.repaired)
    if plan.skipped:
        notes.notes.append(f"Annotations '{where}': only annotations are regions; skipped "
                           + ", ".join(f"{n} {kind}" for kind, n in sorted(plan.skipped.items())))
    if not notes.rows:
        why = (f"every region was refused ({len(plan.refused)}; see the lines of '{where}')"
               if plan.refused else f"'{where}' holds no annotated region")
        notes.rejected.append((slide, f"{Reason.NO_REGION}: {why}"))
    else:
        mixed = sum(row["n_tiles_mixed"] for row in notes.rows)
        notes.notes.append(
            f"Slide '{slide}': {len(notes.rows)} regions, {len(plan.tiles.indices)} tiles inside "
            f"them ({sum(row['n_tiles'] for row in notes.rows)} with tissue), {mixed} dropped "
            "as mixed (inside regions of two classes)")


def log_annotated(results: Sequence[AnnotatedSlide]) -> None:
    """The manifest step's lines about annotated slides, in the main process."""
    for result in results:
        for line in result.warnings:
            logger.warning(line)
        for line in result.notes:
            logger.info(line)


# ----------------------------------------------------------------------------- tiles


def annotated_tiles(root: Path, settings: IngestionParams, rows: Sequence[dict[str, Any]]
                    ) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """The kept tiles of one annotated slide's manifest ``rows`` (its regions with tiles), read
    one strip at a time, each with its slide, region and place."""
    first = rows[0]
    path = root / PurePosixPath(str(first["slide_path"]))
    where = path.parent / str(first["annotations"])
    read_verified(path, str(first["sha256"]), whole=False)
    data = read_verified(where, str(first["annotations_sha256"]), whole=True)
    wanted = {str(row["region"]): row for row in rows}
    tiling = settings.tiling
    try:
        with open_slide(path, str(path)) as slide:
            plan = plan_regions(slide, data, where.name, settings)
            keep = [k for k, i in enumerate(plan.tiles.region)
                    if plan.regions[i].id in wanted
                    and plan.tissue[k] >= tiling.min_tissue_fraction]
            indices = [int(plan.tiles.indices[k]) for k in keep]
            tissue = np.zeros(len(plan.grid.positions))
            tissue[plan.tiles.indices] = plan.tissue
            tiles = iter_slide_tiles(slide, plan.grid, tissue, indices, tiling.input_size)
            for k, tile in zip(keep, tiles, strict=True):
                region = plan.regions[plan.tiles.region[k]]
                row = wanted[region.id]
                yield tile.tile, {
                    "image_path": row["image_path"], "label": row["label"],
                    "group": row["group"], "x": tile.x, "y": tile.y,
                    "tissue_fraction": round(tile.tissue_fraction, 4),
                    "level": plan.grid.read_level, "tile_px": plan.grid.side0,
                    "mpp": plan.grid.mpp, "slide_path": row["slide_path"],
                    "region": region.id,
                    "region_fraction": round(float(plan.tiles.fraction[k]), 4),
                }
    except ImageRejected as exc:  # it passed the manifest's checks: it changed or is damaged
        raise RawDataChangedError(f"{exc}; rerun the ingestion pipeline.") from exc
