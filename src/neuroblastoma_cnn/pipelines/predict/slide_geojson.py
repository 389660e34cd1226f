"""A predicted slide as QuPath imports it: one GeoJSON FeatureCollection per slide, written by
the predict pipeline (always) and the command (beside ``--tiles-out`` or ``--heatmaps``).

Decisions:

- Each tile is a QuPath ``detection`` (a square, level-0 pixels, the slide's own coordinates):
  its top class as ``classification`` (``name`` and a ``color`` per class, the same in every
  file), every ``prob_<class>`` and ``tissue_fraction`` as ``measurements`` (QuPath colours
  detections by a measurement: Measure > Show measurement maps). Whatever else the tile table
  holds is passed through: numbers and flags (``refer``, test-time augmentation...) as
  measurements (a flag as 0/1), text (``prediction_set``...) under ``metadata``.
- One more feature sums the slide up: an ``annotation`` over the tiles' extent, classified as the
  slide's prediction, with the slide's mean probabilities, ``share_<class>``, ``n_tiles`` and
  flags as measurements, locked so that it is not moved by mistake.
- Only slides get a file (crops have no coordinates worth a viewer); a rejected slide none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import shapely

from neuroblastoma_cnn.analysis.predictions import probability_column
from neuroblastoma_cnn.images.annotations import feature_collection, qupath_feature

GEOJSON_SUFFIX = ".geojson"
#: Tile-table columns that place a tile (not passed through as measurements).
PLACE_COLUMNS = ("file", "x", "y", "level", "tile_px", "mpp")
#: Prediction-table columns that are not the slide's measurements.
ROW_TEXT = ("file", "predicted", "reason", "model", "width", "height", "rejected")
#: QuPath class colours, by class index (Tableau 10, wrapping).
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def class_color(classes: Sequence[str], label: str) -> tuple[int, int, int]:
    return PALETTE[list(classes).index(label) % len(PALETTE)]


def geojson_name(file: str) -> str:
    """``a/b.svs`` -> ``a/b.svs.geojson`` (beside ``a/b.svs.heatmap.png``)."""
    parts = [p if p != ".." else "__" for p in PurePosixPath(str(file).replace("\\", "/")).parts
             if p not in ("/", ".")]
    return "/".join(p.replace(":", "_") for p in parts) + GEOJSON_SUFFIX


def slide_geojsons(predictions: pd.DataFrame, tiles: pd.DataFrame, classes: Sequence[str]
                   ) -> dict[str, dict[str, Any]]:
    """``{file: FeatureCollection}`` of every predicted slide (files whose tiles have a
    level-0 size)."""
    if "tile_px" not in tiles.columns or tiles.empty:
        return {}
    slide_tiles = tiles[pd.to_numeric(tiles["tile_px"], errors="coerce").notna()]
    by_file = dict(tuple(slide_tiles.groupby(slide_tiles["file"].astype(str), sort=False)))
    done = predictions[~predictions["rejected"].astype(bool)]
    return {str(row["file"]): slide_features(row, by_file[str(row["file"])], classes)
            for row in done.to_dict("records") if str(row["file"]) in by_file}


def slide_features(row: Mapping[str, Any], tiles: pd.DataFrame, classes: Sequence[str]
                   ) -> dict[str, Any]:
    """One slide's FeatureCollection: a detection per tile, then the slide's summary."""
    columns = [probability_column(c) for c in classes]
    prob = tiles[columns].to_numpy(dtype=float)
    top = np.asarray(classes)[prob.argmax(axis=1)]
    place = tiles[["x", "y", "tile_px"]].apply(pd.to_numeric).to_numpy(dtype=float)
    boxes = shapely.box(place[:, 0], place[:, 1], place[:, 0] + place[:, 2],
                        place[:, 1] + place[:, 2])
    extra = [c for c in tiles.columns if c not in PLACE_COLUMNS]
    features = [
        qupath_feature(box, "detection", label, class_color(classes, label), **_split(values))
        for box, label, values in zip(boxes, top, tiles[extra].to_dict("records"), strict=True)
    ]
    summary = {k: v for k, v in row.items() if k not in ROW_TEXT}
    predicted = str(row["predicted"])
    features.append(qupath_feature(
        shapely.box(*shapely.total_bounds(boxes)), "annotation", predicted,
        class_color(classes, predicted), name=f"{row['file']}: {predicted} (slide summary)",
        isLocked=True, **_split(summary, metadata={"file": str(row["file"]),
                                                    "model": str(row.get("model", ""))})))
    return feature_collection(features)


def _split(values: Mapping[str, Any], metadata: Mapping[str, str] | None = None
           ) -> dict[str, Any]:
    """``measurements`` (numbers; flags as 0/1) and ``metadata`` (text) of a feature."""
    numbers: dict[str, float] = {}
    text = dict(metadata or {})
    for key, value in values.items():
        if isinstance(value, bool | np.bool_):
            numbers[key] = float(value)
        elif isinstance(value, int | float | np.integer | np.floating):
            if np.isfinite(value):
                numbers[key] = float(value)
        elif value is not None and not (isinstance(value, float) and np.isnan(value)) \
                and str(value) not in ("", "<NA>"):
            text[key] = str(value)
    return {"measurements": numbers, **({"metadata": text} if text else {})}
