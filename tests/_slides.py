"""Small whole-slide images for tests and benchmarks, written with tifffile (no download).

A slide here is a pyramidal tiled TIFF (level 0 plus SubIFD levels at 1/2, 1/4 ...), with a
resolution tag unless ``mpp`` is None. Tissue comes from BACH images (their licence: written to
temporary folders only); the white margin around them is background.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

BACH_DIR = Path(os.environ.get("BACH_DIR", Path(__file__).resolve().parents[2] / "shared" /
                               "data" / "bach"))


def bach_image(label: str, index: int = 0, downscale: int = 8) -> np.ndarray:
    """One BACH image of class ``label`` (sorted file order), downscaled (JPEG draft: fast)."""
    files = sorted((BACH_DIR / "images" / label).glob("*.jpg"))
    with Image.open(files[index]) as image:
        size = (image.width // downscale, image.height // downscale)
        image.draft("RGB", size)
        return np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR))


def side_by_side(images: list[np.ndarray], margin: int = 0) -> np.ndarray:
    """Images in a row on a white canvas, ``margin`` white pixels around each."""
    height = max(i.shape[0] for i in images) + 2 * margin
    width = sum(i.shape[1] + 2 * margin for i in images)
    canvas = np.full((height, width, 3), 255, np.uint8)
    left = 0
    for image in images:
        canvas[margin:margin + image.shape[0], left + margin:left + margin + image.shape[1]] = image
        left += image.shape[1] + 2 * margin
    return canvas


def write_slide(path: Path, rgb: np.ndarray, mpp: float | None = 0.5, levels: int = 3,
                tile: int = 64, compression: str | None = "zlib") -> Path:
    """Writes ``rgb`` as a pyramidal tiled TIFF: level 0 and ``levels - 1`` halvings, each a
    page of its own marked reduced (OpenSlide's "generic-tiff" layout; tiffslide reads it too,
    while OpenSlide would see only level 0 of a pyramid kept in SubIFDs)."""
    import tifffile  # noqa: PLC0415

    options = {"tile": (tile, tile), "photometric": "rgb", "compression": compression}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for i, level in enumerate(pyramid(rgb, levels)):
            extra = ({"resolution": (1e4 / (mpp * 2**i),) * 2, "resolutionunit": "CENTIMETER"}
                     if mpp is not None else {})
            tif.write(level, subfiletype=1 if i else 0, **options, **extra)
    return path


def pyramid(rgb: np.ndarray, levels: int) -> list[np.ndarray]:
    """``rgb`` and ``levels - 1`` successive halvings (2 x 2 box filter)."""
    out = [rgb]
    for _ in range(levels - 1):
        out.append(np.asarray(Image.fromarray(out[-1]).reduce(2)))
    return out


def write_svs(path: Path, rgb: np.ndarray, mpp: float = 0.5, levels: int = 3, tile: int = 64,
              compression: str = "jpeg") -> Path:
    """Writes ``rgb`` as an Aperio SVS as ScanScope lays it out: level 0, a stripped thumbnail,
    then the other levels, each page described by an "Aperio Image Library" header with the
    ``MPP`` (what OpenSlide's "aperio" reader and tiffslide both recognise)."""
    import tifffile  # noqa: PLC0415

    height, width = rgb.shape[:2]
    head = f"Aperio Image Library v12.0.0\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile})"
    tail = f"|AppMag = 20|MPP = {mpp}"
    options = {"photometric": "rgb", "compression": compression, "metadata": None}
    levels_rgb = pyramid(rgb, levels)
    thumb = np.asarray(Image.fromarray(rgb).reduce(8))
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, tile=(tile, tile), description=f"{head} JPEG/RGB Q=90{tail}", **options)
        tif.write(thumb, description=f"{head} -> {thumb.shape[1]}x{thumb.shape[0]}{tail}",
                  **options)
        for level in levels_rgb[1:]:
            tif.write(level, tile=(tile, tile), description=(
                f"{head} -> {level.shape[1]}x{level.shape[0]} JPEG/RGB Q=90{tail}"), **options)
    return path


def write_large_slide(path: Path, sources: list[np.ndarray], width: int, height: int,
                      mpp: float = 0.25, downsamples: tuple[int, ...] = (1, 4, 16, 64),
                      tile: int = 512) -> Path:
    """A ``width x height`` slide tiling ``sources`` (images of one size) in a checkerboard
    cycle, written tile by tile (JPEG), each level from sources downscaled by its factor, so
    writing it never holds more than one tile of any level (levels laid out as
    :func:`write_slide`'s)."""
    import tifffile  # noqa: PLC0415

    src_h, src_w = sources[0].shape[:2]

    def tiles(down: int) -> Iterator[np.ndarray]:
        small = [np.asarray(Image.fromarray(s).resize((src_w // down, src_h // down),
                                                      Image.Resampling.BILINEAR))
                 for s in sources]
        sh, sw = small[0].shape[:2]
        stack = np.stack(small)
        level_w, level_h = width // down, height // down
        for top in range(0, level_h, tile):
            for left in range(0, level_w, tile):
                out = np.full((tile, tile, 3), 255, np.uint8)
                ys = np.arange(top, min(top + tile, level_h))
                xs = np.arange(left, min(left + tile, level_w))
                which = ((ys[:, None] // sh) + (xs[None, :] // sw)) % len(small)
                out[: len(ys), : len(xs)] = stack[which, (ys % sh)[:, None], (xs % sw)[None, :]]
                yield out

    options = {"tile": (tile, tile), "photometric": "rgb", "compression": "jpeg",
               "dtype": np.uint8, "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for i, down in enumerate(downsamples):
            shape = (height // down, width // down, 3)
            tif.write(tiles(down), shape=shape, resolution=(1e4 / (mpp * down),) * 2,
                      subfiletype=1 if i else 0, **options)
    return path


# ----------------------------------------------------------------------------- annotations
#: A region: (id, class or None, polygons as rings of (x, y) level-0 pixels; a polygon's first
#: ring is its outline, the others its holes).
RegionSpec = tuple[str, str | None, list[list[list[tuple[float, float]]]]]


def rectangle(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    """A closed ring around ``(x0, y0)-(x1, y1)``."""
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]


def write_qupath_geojson(path: Path, regions: list[RegionSpec]) -> Path:
    """``regions`` as QuPath 0.4+ exports annotations (File > Export objects as GeoJSON)."""
    import json  # noqa: PLC0415

    features = []
    for region_id, label, polygons in regions:
        coordinates = [[[list(p) for p in ring] for ring in polygon] for polygon in polygons]
        geometry = ({"type": "Polygon", "coordinates": coordinates[0]} if len(polygons) == 1
                    else {"type": "MultiPolygon", "coordinates": coordinates})
        properties: dict = {"objectType": "annotation"}
        if label is not None:
            properties["classification"] = {"name": label, "color": [200, 0, 0]}
        features.append({"type": "Feature", "id": region_id, "geometry": geometry,
                         "properties": properties})
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def write_imagescope_xml(path: Path, layers: dict[str, list[tuple[list[tuple[float, float]],
                                                                  bool]]]) -> Path:
    """``{layer name: [(vertices, negative)]}`` as ImageScope saves it beside a slide (open
    rings: ImageScope does not repeat the first vertex)."""
    lines = ['<?xml version="1.0" encoding="UTF-8"?>', '<Annotations MicronsPerPixel="0.5">']
    for layer_id, (name, regions) in enumerate(layers.items(), start=1):
        lines.append(f'<Annotation Id="{layer_id}" Name="{name}" LineColor="65280">'
                     '<Regions>')
        for region_id, (vertices, negative) in enumerate(regions, start=1):
            lines.append(f'<Region Id="{region_id}" Type="0" Text="" '
                         f'NegativeROA="{int(negative)}"><Attributes/><Vertices>')
            ring = vertices[:-1] if vertices[0] == vertices[-1] else vertices
            lines.extend(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in ring)
            lines.append("</Vertices></Region>")
        lines.append("</Regions><Plots/></Annotation>")
    lines.append("</Annotations>")
    path.write_text("\n".join(lines))
    return path
