"""Annotated regions against a slide's tile grid: which regions can be used, and which tiles lie
inside one (and take its class).

Decisions:

- A region is refused, with its id and one reason, when it has no class, when its class is not
  among the configured ones (if any are), or when it reaches outside the slide by more than
  :data:`BOUNDS_TOLERANCE` pixels (annotations drawn on another scan, or on the wrong slide).
- A tile's *class fraction* is the share of its area inside that class's regions (regions of
  one class that overlap count once per region, capped at 1). A tile is kept for its top class
  when that fraction reaches ``min_fraction`` and no other class covers more than
  :data:`MIXED_TOLERANCE` of it; a tile that reaches ``min_fraction`` but also lies in a region
  of another class is *mixed*: dropped and counted (a tile at the border of two classes holds
  both tissues; the tolerance forgives the slivers two hand-drawn borders leave).
- The region a tile comes from is, of its class's regions, the one covering most of it.
- Speed: the regions go into a shapely ``STRtree`` and are prepared; a tile lying wholly inside a
  region needs no intersection, so only border tiles are intersected (50 regions on a
  40,000 x 40,000 px slide: ``benchmarks/bench_slides.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import shapely

from neuroblastoma_cnn.images.annotations import Annotations, Region

#: Pixels a region may reach beyond the slide's edge (rounding of hand-drawn borders).
BOUNDS_TOLERANCE = 1.0
#: Share of a tile another class's regions may cover before the tile is mixed.
MIXED_TOLERANCE = 0.01


def usable_regions(annotations: Annotations, width: int, height: int,
                   classes: Sequence[str] | None) -> tuple[list[Region], list[tuple[str, str]]]:
    """``(regions kept, [(region id, why refused)])`` for a ``width x height`` slide; the
    file's own refusals (not an area, unreadable geometry) come first."""
    refused = list(annotations.refused)
    kept = []
    for region in annotations.regions:
        x0, y0, x1, y1 = region.geometry.bounds
        if region.label is None:
            refused.append((region.id, "no class (QuPath: set its classification; "
                                       "ImageScope: see ingestion.imagescope_class)"))
        elif classes is not None and region.label not in classes:
            refused.append((region.id, f"class '{region.label}' is not in "
                                       f"ingestion.annotation_classes ({', '.join(classes)})"))
        elif (x0 < -BOUNDS_TOLERANCE or y0 < -BOUNDS_TOLERANCE
              or x1 > width + BOUNDS_TOLERANCE or y1 > height + BOUNDS_TOLERANCE):
            refused.append((region.id, (
                f"coordinates outside the slide: ({x0:.0f}, {y0:.0f})-({x1:.0f}, {y1:.0f}) on a "
                f"{width} x {height} px slide (annotations of another slide or scan?)")))
        else:
            kept.append(region)
    return kept, refused


@dataclass(frozen=True)
class RegionTiles:
    """Grid tiles inside regions: ``indices`` (grid order) with the ``region`` (index into the
    regions) and class ``fraction`` of each; ``mixed`` tiles dropped, with their top region."""

    indices: np.ndarray
    region: np.ndarray
    fraction: np.ndarray
    mixed: np.ndarray
    mixed_region: np.ndarray


def tiles_in_regions(positions: Sequence[tuple[int, int]], side: int, regions: Sequence[Region],
                     min_fraction: float) -> RegionTiles:
    """Which of the ``side``-pixel tiles at level-0 ``positions`` lie inside a region (see the
    module's decisions)."""
    empty = np.zeros(0, np.int64)
    if not regions or not len(positions):
        return RegionTiles(empty, empty, np.zeros(0), empty, empty)
    xy = np.asarray(positions, np.float64).reshape(-1, 2)
    boxes = shapely.box(xy[:, 0], xy[:, 1], xy[:, 0] + side, xy[:, 1] + side)
    geometries = np.array([r.geometry for r in regions], dtype=object)
    shapely.prepare(geometries)
    tile_of, region_of = shapely.STRtree(geometries).query(boxes, predicate="intersects")
    area = np.ones(len(tile_of))
    border = ~shapely.contains_properly(geometries[region_of], boxes[tile_of])
    area[border] = shapely.area(shapely.intersection(boxes[tile_of[border]],
                                                     geometries[region_of[border]])) / side**2
    labels = sorted({str(r.label) for r in regions})
    class_of = np.array([labels.index(str(r.label)) for r in regions])[region_of]
    fractions = np.zeros((len(boxes), len(labels)))
    np.add.at(fractions, (tile_of, class_of), area)
    np.minimum(fractions, 1.0, out=fractions)
    ranked = np.sort(fractions, axis=1)[:, ::-1]
    top_class = fractions.argmax(axis=1)
    second = ranked[:, 1] if len(labels) > 1 else np.zeros(len(boxes))
    inside = (ranked[:, 0] >= min_fraction) & (ranked[:, 0] > 0)
    mixed = inside & (second > MIXED_TOLERANCE)
    kept = inside & ~mixed
    best = _largest_region(tile_of, region_of, area, class_of == top_class[tile_of], len(boxes))
    kept_at, mixed_at = np.flatnonzero(kept), np.flatnonzero(mixed)
    return RegionTiles(kept_at, best[kept_at], ranked[kept_at, 0], mixed_at, best[mixed_at])


def _largest_region(tile_of: np.ndarray, region_of: np.ndarray, area: np.ndarray,
                    wanted: np.ndarray, n_tiles: int) -> np.ndarray:
    """For each tile, the region (among the ``wanted`` tile-region pairs) covering most of it;
    -1 for a tile without one."""
    best = np.full(n_tiles, -1, np.int64)
    tiles, regions, areas = tile_of[wanted], region_of[wanted], area[wanted]
    order = np.lexsort((regions, -areas, tiles))  # largest area first; ties: lowest region
    firsts = np.unique(tiles[order], return_index=True)[1]
    best[tiles[order][firsts]] = regions[order][firsts]
    return best
