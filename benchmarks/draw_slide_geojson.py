"""Draws a slide's annotations and its exported QuPath predictions over its thumbnail: the README's
picture of "Slides with annotations" (QuPath cannot run here, so the project draws what QuPath
would show, to check that the GeoJSON lands where it should).

    .venv/bin/python benchmarks/draw_slide_geojson.py            # docs/slide-annotations.png
    .venv/bin/python benchmarks/draw_slide_geojson.py --slide s.svs --annotations s.geojson \\
        --predictions s.svs.geojson --out /tmp/s.png              # any slide and its files

The default picture is drawn from a *synthetic* slide (textures from ``tests/_synthetic_tissue``,
no BACH pixels: BACH may not be committed), 2,048 x 1,024 px at 0.5 um/px: "Stroma" (smooth
pink) on the left, "Tumor" (stripes) on the right, and one patch of each below, outside the
regions. It annotates a Stroma region with a hole and a Tumor region in QuPath GeoJSON, runs
annotated ingestion (left panel: the regions and the tiles ingestion kept), trains a tiny CNN on
those tiles (seconds), predicts the slide with ``neuroblastoma-cnn predict --tiles-out`` and draws
the GeoJSON it exported (right panel: a detection a tile in its predicted class's colour, the
locked slide summary as a dashed outline). Everything but the picture is written to a temporary
folder.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from neuroblastoma_cnn.images.annotations import read_annotations, read_qupath_geojson  # noqa: E402
from neuroblastoma_cnn.images.slides import open_slide  # noqa: E402

logger = logging.getLogger("draw_slide_geojson")

CLASSES = ["Stroma", "Tumor"]  # QuPath's default class names
MPP = 0.5
TILE_UM = 32.0  # 64 px tiles at 0.5 um/px
THUMB = 1024


def _rings(geometry) -> list[list[tuple[float, float]]]:
    """Every outline and hole of a Polygon or MultiPolygon."""
    polygons = getattr(geometry, "geoms", [geometry])
    return [list(ring.coords) for p in polygons for ring in (p.exterior, *p.interiors)]


def _scaled(ring: list[tuple[float, float]], scale: float) -> list[tuple[float, float]]:
    return [(x * scale, y * scale) for x, y in ring]


def _dashed(draw: ImageDraw.ImageDraw, ring: list[tuple[float, float]], fill, width: int,
            dash: float = 12.0) -> None:
    for (x0, y0), (x1, y1) in itertools.pairwise(ring):
        length = float(np.hypot(x1 - x0, y1 - y0))
        for start in np.arange(0, length, 2 * dash):
            a, b = start / length, min(start + dash, length) / length
            draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)),
                       (x0 + b * (x1 - x0), y0 + b * (y1 - y0))], fill=fill, width=width)


def _panel(thumb: np.ndarray) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.fromarray(thumb)  # RGB: an RGBA pen blends over it
    return image, ImageDraw.Draw(image, "RGBA")


class _Colours(dict):
    """A colour per class, in the order classes are first met (QuPath's palette)."""

    def of(self, label: str | None) -> tuple[int, int, int]:
        from neuroblastoma_cnn.pipelines.predict.slide_geojson import PALETTE  # noqa: PLC0415

        if label is None:
            return (0, 0, 0)
        return self.setdefault(label, PALETTE[len(self) % len(PALETTE)])


def _regions_panel(thumb: np.ndarray, scale: float, annotations: Path | None,
                   kept_tiles: list[tuple[int, int, int, str]], colours: _Colours) -> Image.Image:
    image, pen = _panel(thumb)
    if annotations is None:
        return image
    found = read_annotations(annotations.read_bytes(), annotations.name, "annotation_name")
    for x, y, side, label in kept_tiles:
        box = [x * scale, y * scale, (x + side) * scale - 1, (y + side) * scale - 1]
        pen.rectangle(box, outline=(*colours.of(label), 160), width=1)
    for region in found.regions:
        for ring in _rings(region.geometry):
            pen.line(_scaled(ring, scale), fill=(*colours.of(region.label), 255), width=4)
    return image


def _predictions_panel(thumb: np.ndarray, scale: float, predictions: Path | None,
                       colours: _Colours) -> Image.Image:
    image, pen = _panel(thumb)
    if predictions is None:
        return image
    data = predictions.read_bytes()
    for region in read_qupath_geojson(data, predictions.name, object_types=("detection",)).regions:
        rgb = colours.of(region.label)
        for ring in _rings(region.geometry):
            pen.polygon(_scaled(ring, scale), fill=(*rgb, 110), outline=(*rgb, 220))
    for region in read_qupath_geojson(data, predictions.name).regions:  # the slide's summary
        for ring in _rings(region.geometry):
            _dashed(pen, _scaled(ring, scale), (0, 0, 0, 255), 3)
    return image


def draw(slide_path: Path, annotations: Path | None, predictions: Path | None,
         kept_tiles: list[tuple[int, int, int, str]] | None = None,
         classes: tuple[str, ...] = ()) -> Image.Image:
    """The thumbnail twice, side by side: the annotated regions (and ``kept_tiles``, ``(x, y,
    side, class)`` in level-0 pixels) on the left, the exported detections on the right;
    ``classes`` in the model's order take the colours the export gave them."""
    with open_slide(slide_path) as slide:
        thumb = slide.thumbnail(THUMB)
        scale = thumb.shape[1] / slide.dimensions[0]
    colours = _Colours()
    for label in classes:
        colours.of(label)
    panels = [_regions_panel(thumb, scale, annotations, kept_tiles or [], colours),
              _predictions_panel(thumb, scale, predictions, colours)]
    return _side_by_side(panels, ["Annotations in (regions, tiles kept)",
                                  "Predictions out (exported GeoJSON)"], colours)


def _side_by_side(panels: list[Image.Image], titles: list[str],
                  colours: dict[str, tuple[int, int, int]]) -> Image.Image:
    gap, head = 16, 36
    font = ImageFont.load_default(size=20)
    width = sum(p.width for p in panels) + gap * (len(panels) + 1)
    height = max(p.height for p in panels) + head + gap + 28
    canvas = Image.new("RGB", (width, height), "white")
    pen = ImageDraw.Draw(canvas)
    left = gap
    for panel, title in zip(panels, titles, strict=True):
        canvas.paste(panel, (left, head))
        pen.text((left, 8), title, fill="black", font=font)
        left += panel.width + gap
    x = gap
    for label, rgb in colours.items():
        pen.rectangle([x, height - 26, x + 18, height - 8], fill=rgb)
        pen.text((x + 26, height - 28), label, fill="black", font=font)
        x += 140
    pen.text((x, height - 28), "- - - slide summary", fill="black", font=font)
    return canvas


# ----------------------------------------------------------------------------- the synthetic demo


def _texture(label: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """``height x width`` of one synthetic tissue class, patches of 128 px."""
    from _synthetic_tissue import CLASSES as TEXTURES  # noqa: PLC0415
    from _synthetic_tissue import tissue  # noqa: PLC0415

    kind = TEXTURES[0] if label == "Stroma" else TEXTURES[2]  # smooth pink, stripes
    rows = []
    for _ in range(0, height, 128):
        rows.append(np.concatenate([tissue(kind, rng, 128) for _ in range(0, width, 128)], 1))
    return np.concatenate(rows)[:height, :width]


def synthetic_slide(folder: Path) -> tuple[Path, Path]:
    """A 2,048 x 1,024 px slide of two synthetic classes (blobs on white) and its QuPath
    GeoJSON: a Stroma region with a hole over the left blob, a Tumor region over the right one;
    the two small patches below are left unannotated."""
    from _slides import rectangle, write_qupath_geojson, write_slide  # noqa: PLC0415

    rng = np.random.default_rng(0)
    height, width = 1024, 2048
    canvas = np.full((height, width, 3), 245, np.uint8)
    y, x = np.mgrid[:height, :width]
    blobs = [("Stroma", (520, 360), (420, 260)), ("Tumor", (1500, 380), (380, 280)),
             ("Stroma", (1200, 860), (150, 100)), ("Tumor", (420, 870), (170, 100))]
    for label, (cx, cy), (rx, ry) in blobs:
        inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
        canvas[inside] = _texture(label, height, width, rng)[inside]
    slide = write_slide(folder / "demo.tif", canvas, mpp=MPP, levels=4, tile=256)
    angles = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    stroma = [(520 + 380 * np.cos(a), 360 + 220 * np.sin(a)) for a in angles]
    tumor = [(1500 + 340 * np.cos(a) + 30 * np.sin(3 * a), 380 + 240 * np.sin(a))
             for a in angles]
    annotations = write_qupath_geojson(folder / "demo.geojson", [
        ("stroma", "Stroma", [[[*stroma, stroma[0]], rectangle(460, 300, 600, 420)]]),
        ("tumor", "Tumor", [[[*tumor, tumor[0]]]]),
    ])
    return slide, annotations


def demo(out: Path) -> None:
    import keras  # noqa: PLC0415

    from neuroblastoma_cnn.cli.commands import main as cli  # noqa: PLC0415
    from neuroblastoma_cnn.datasets import save_keras_model  # noqa: PLC0415
    from neuroblastoma_cnn.images.preprocessing import (  # noqa: PLC0415
        Preprocessing,
        attach_preprocessing,
    )
    from neuroblastoma_cnn.params import IngestionParams, base_group  # noqa: PLC0415
    from neuroblastoma_cnn.pipelines.ingestion.nodes import (  # noqa: PLC0415
        build_image_manifest,
        tile_images,
    )

    with tempfile.TemporaryDirectory(prefix="slide_geojson_") as tmp:
        work = Path(tmp)
        (work / "raw").mkdir()
        slide, annotations = synthetic_slide(work / "raw")
        settings = IngestionParams.parse(base_group(
            "ingestion", tile_size=64, stride=None, input_size=32, workers=1, tile_um=TILE_UM,
            annotation_classes=CLASSES), "ingestion")
        manifest, _ = build_image_manifest(work / "raw", settings)
        records = list(tile_images(work / "raw", manifest, settings))
        kept = [(int(m["x"]), int(m["y"]), int(m["tile_px"]), str(m["label"]))
                for _, m in records]
        logger.info("ingestion kept %d tiles from %d regions", len(kept), len(manifest))
        x = np.stack([t for t, _ in records]).astype(np.float32)
        y = np.array([CLASSES.index(label) for *_, label in kept])
        keras.utils.set_random_seed(0)
        inputs = keras.Input((32, 32, 3))
        h = keras.layers.Rescaling(1 / 255)(inputs)
        h = keras.layers.Conv2D(8, 3, activation="relu")(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        model = keras.Model(inputs, keras.layers.Dense(len(CLASSES), activation="softmax")(h))
        model.compile(optimizer=keras.optimizers.Adam(1e-2),
                      loss="sparse_categorical_crossentropy")
        model.fit(x, y, epochs=30, batch_size=32, verbose=0)
        attach_preprocessing(model, Preprocessing(
            classes=CLASSES, image_checks=settings.image_checks, tiling=settings.tiling,
            architecture="tiny"), "demo model")
        save_keras_model(model, work / "demo.keras")
        tiles_out = work / "out" / "tiles.csv"
        code = cli(["predict", str(slide), "-m", str(work / "demo.keras"), "-q",
                    "-o", str(work / "out" / "predictions.csv"), "--tiles-out", str(tiles_out)])
        if code != 0:
            raise SystemExit(f"predict failed ({code})")
        picture = draw(slide, annotations, tiles_out.parent / "demo.tif.geojson", kept,
                       tuple(CLASSES))
    picture.save(out, optimize=True)
    logger.info("wrote %s", out)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, help="a slide (default: the synthetic demo)")
    parser.add_argument("--annotations", type=Path, help="its QuPath GeoJSON or ImageScope XML")
    parser.add_argument("--predictions", type=Path, help="its exported <slide>.geojson")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "slide-annotations.png")
    args = parser.parse_args()
    if args.slide is None:
        demo(args.out)
        return
    draw(args.slide, args.annotations, args.predictions).save(args.out, optimize=True)
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
