"""Ingestion of whole-slide images next to crops: manifest rows, traceable tiles, rejections,
and crops' results unchanged by a slide beside them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _params import params
from _slides import BACH_DIR, bach_image, side_by_side, write_slide
from PIL import Image

from neuroblastoma_cnn.pipelines.ingestion.nodes import build_image_manifest, tile_images

pytestmark = pytest.mark.skipif(not (BACH_DIR / "images").is_dir(), reason="no BACH images")

PARAMS = params("ingestion", tile_size=64, stride=None, input_size=32, min_tissue_fraction=0.5,
                workers=1, tile_um=32.0)


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Crops (PNG) of two classes, one slide per class, and bad slides, in patient folders."""
    root = tmp_path_factory.mktemp("raw")
    for label in ("Benign", "Invasive"):
        folder = root / label / f"{label}-P1"
        folder.mkdir(parents=True)
        Image.fromarray(bach_image(label, 0)).save(folder / "crop.png")
        slide = side_by_side([bach_image(label, 1), bach_image(label, 2)], margin=32)
        write_slide(root / label / f"{label}-P2.tif", slide, mpp=0.5)
    bad = root / "Benign" / "bad"
    bad.mkdir()
    write_slide(bad / "nores.tif", side_by_side([bach_image("Benign", 3)]), mpp=None)
    write_slide(bad / "white.tif", np.full((256, 256, 3), 250, np.uint8), mpp=0.5)
    data = (root / "Invasive" / "Invasive-P2.tif").read_bytes()
    (bad / "cut.svs").write_bytes(data[: len(data) // 3])
    return root


def test_slides_and_crops_in_one_manifest(raw: Path) -> None:
    manifest, rejected = build_image_manifest(raw, PARAMS)
    rows = manifest.set_index("image_path")
    assert list(rows.index) == ["Benign/Benign-P1/crop.png", "Benign/Benign-P2.tif",
                                "Benign/bad/white.tif", "Invasive/Invasive-P1/crop.png",
                                "Invasive/Invasive-P2.tif"]
    slide = rows.loc["Benign/Benign-P2.tif"]
    assert bool(slide["slide"]) and slide["mpp"] == pytest.approx(0.5)
    assert (slide["width"], slide["height"], slide["levels"], slide["tile_px"]) == (640, 256, 3,
                                                                                    64)
    assert slide["group"] == "Benign/Benign-P2.tif" and slide["label"] == "Benign"
    assert not rows.loc["Benign/Benign-P1/crop.png", "slide"]
    reasons = dict(zip(rejected["file"], rejected["reason"], strict=True))
    assert reasons["Benign/bad/nores.tif"].startswith("no slide resolution")
    assert reasons["Benign/bad/cut.svs"].startswith(("unreadable slide", "truncated"))
    assert reasons["Benign/bad/white.tif"].startswith("mostly background")
    assert all("\n" not in r for r in reasons.values())


def test_slide_tiles_trace_back_to_their_place(raw: Path) -> None:
    manifest, _ = build_image_manifest(raw, PARAMS)
    records = list(tile_images(raw, manifest, PARAMS))
    meta = pd.DataFrame([m for _, m in records])
    slide = meta[meta["image_path"] == "Invasive/Invasive-P2.tif"]
    expected = manifest.set_index("image_path").loc["Invasive/Invasive-P2.tif", "n_tiles"]
    assert len(slide) == expected > 0
    assert set(slide["level"]) == {1} and set(slide["tile_px"]) == {64}
    assert set(slide["mpp"]) == {0.5}
    assert (slide["x"] % 64 == 0).all() and (slide["y"] % 64 == 0).all()
    assert all(tile.shape == (32, 32, 3) for tile, _ in records)
    crops = meta[meta["image_path"].str.endswith(".png")]
    assert crops[["level", "tile_px", "mpp"]].isna().all().all()


def test_crops_are_tiled_as_without_the_slides(raw: Path, tmp_path: Path) -> None:
    only = tmp_path / "crops"
    for crop in raw.glob("*/*-P1/crop.png"):
        dest = only / crop.relative_to(raw)
        dest.parent.mkdir(parents=True)
        shutil.copy(crop, dest)
    crops_manifest, _ = build_image_manifest(only, PARAMS)
    assert "slide" not in crops_manifest.columns  # crop-only manifests keep their columns
    crop_records = list(tile_images(only, crops_manifest, PARAMS))
    mixed_manifest, _ = build_image_manifest(raw, PARAMS)
    mixed = [(t, m) for t, m in tile_images(raw, mixed_manifest, PARAMS)
             if m["image_path"].endswith(".png")]
    assert len(mixed) == len(crop_records)
    for (a, meta_a), (b, meta_b) in zip(crop_records, mixed, strict=True):
        assert np.array_equal(a, b) and meta_a == meta_b
