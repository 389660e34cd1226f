"""Ingestion of slides with annotated regions (QuPath GeoJSON, ImageScope XML): a manifest row
per region, every tile of the class of the image it was cut from and inside its region, mixed
tiles dropped and counted, and every bad input one line naming its file and region."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
from _params import params
from _slides import (
    BACH_DIR,
    bach_image,
    rectangle,
    side_by_side,
    write_imagescope_xml,
    write_qupath_geojson,
    write_slide,
)
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from neuroblastoma_cnn.images.slides import READER_VARIABLE, open_slide
from neuroblastoma_cnn.pipelines.ingestion import manifest as manifest_module
from neuroblastoma_cnn.pipelines.ingestion.annotated import plan_regions
from neuroblastoma_cnn.pipelines.ingestion.nodes import (
    NoUsableImagesError,
    RawDataChangedError,
    build_image_manifest,
    tile_images,
)

pytestmark = pytest.mark.skipif(not (BACH_DIR / "images").is_dir(), reason="no BACH images")

#: 32 px tiles (16 um at 0.5 um/px) read at level 0 as they are.
PARAMS = params("ingestion", tile_size=32, stride=None, input_size=32, min_tissue_fraction=0.5,
                workers=1, tile_um=16.0, annotation_classes=["Benign", "Invasive"])
#: Where each class's BACH image lies on the slides (side by side, 32 px of white around each).
EXTENT = {"Benign": (32, 32, 288, 224), "Invasive": (352, 32, 608, 224)}
BENIGN = [rectangle(40, 40, 280, 216), rectangle(120, 96, 184, 160)]  # with a hole
WRONG = rectangle(192, 152, 288, 224)  # "Invasive", drawn over the Benign image


@pytest.fixture(scope="module")
def slides() -> dict[str, np.ndarray]:
    return {name: side_by_side([bach_image("Benign", i), bach_image("Invasive", i)], margin=32)
            for i, name in enumerate(("caseA", "caseB"))}


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory, slides) -> Path:
    """caseA with QuPath regions (good and bad), caseB with ImageScope layers, a crop folder."""
    root = tmp_path_factory.mktemp("raw")
    for name, pixels in slides.items():
        write_slide(root / f"{name}.tif", pixels, mpp=0.5)
    write_qupath_geojson(root / "caseA.geojson", [
        ("b1", "Benign", [BENIGN]),
        ("i1", "Invasive", [[rectangle(352, 32, 480, 224)], [rectangle(480, 32, 600, 128)]]),
        ("wrong", "Invasive", [[WRONG]]),
        ("unnamed", None, [[rectangle(360, 150, 400, 200)]]),
        ("stroma", "Stroma", [[rectangle(0, 0, 30, 30)]]),
        ("far", "Benign", [[rectangle(600, 200, 700, 300)]]),
    ])
    write_imagescope_xml(root / "caseB.xml", {
        "Benign": [(BENIGN[0], False), (BENIGN[1], True)],
        "Invasive": [(rectangle(352, 32, 600, 224), False)],
    })
    crops = root / "Benign" / "P1"
    crops.mkdir(parents=True)
    from PIL import Image  # noqa: PLC0415

    Image.fromarray(bach_image("Benign", 3)).save(crops / "crop.png")
    return root


@pytest.fixture(scope="module")
def ingested(raw: Path) -> tuple[pd.DataFrame, pd.DataFrame, list]:
    manifest, rejected = build_image_manifest(raw, PARAMS)
    return manifest, rejected, list(tile_images(raw, manifest, PARAMS))


def test_one_manifest_row_per_region(ingested) -> None:
    manifest, rejected, _ = ingested
    rows = manifest.set_index("image_path")
    assert list(rows.index) == ["Benign/P1/crop.png", "caseA.tif#b1", "caseA.tif#i1",
                                "caseB.tif#1.1", "caseB.tif#2.1"]
    regions = rows.loc[rows["slide_path"].notna()]
    assert regions["label"].tolist() == ["Benign", "Invasive", "Benign", "Invasive"]
    assert regions["group"].tolist() == ["caseA.tif", "caseA.tif", "caseB.tif", "caseB.tif"]
    assert regions["annotations"].tolist() == ["caseA.geojson"] * 2 + ["caseB.xml"] * 2
    assert (regions["n_tiles"] > 20).all() and regions["mpp"].eq(0.5).all()
    assert rows.loc["caseA.tif#b1", "n_tiles_mixed"] > 0  # its border with "wrong"
    assert rows.loc["caseB.tif#1.1", "n_tiles_mixed"] == 0
    reasons = rejected[rejected["file"] == "caseA.geojson"]["reason"].tolist()
    assert len(reasons) == 4 and all(r.startswith("region refused: region '") for r in reasons)
    why = {r.split("'")[1]: r.split("': ", 1)[1] for r in reasons}
    assert why["unnamed"].startswith("no class")
    assert why["stroma"].startswith("class 'Stroma' is not in ingestion.annotation_classes")
    assert why["far"].startswith("coordinates outside the slide")
    assert why["wrong"].startswith("no tile kept")  # every tile of it is mixed


def test_every_tile_is_of_its_image_and_inside_its_region(ingested, slides) -> None:
    manifest, _, records = ingested
    meta = pd.DataFrame([m for _, m in records])
    annotated = meta[meta["slide_path"].notna()]
    assert len(annotated) == manifest.loc[manifest["slide_path"].notna(), "n_tiles"].sum()
    assert set(annotated["level"]) == {0} and set(annotated["tile_px"]) == {32}
    outline = {"Benign": shapely.Polygon(BENIGN[0], [BENIGN[1]]),
               "Invasive": shapely.box(352, 32, 600, 224)}
    wrong = shapely.box(*WRONG[0], *WRONG[2])
    for (tile, m) in records:
        if not isinstance(m.get("slide_path"), str):
            continue
        x, y, label = m["x"], m["y"], m["label"]
        x0, y0, x1, y1 = EXTENT[label]
        assert x0 <= x and x + 32 <= x1 and y0 <= y and y + 32 <= y1  # on its class's image
        box = shapely.box(x, y, x + 32, y + 32)
        assert box.intersection(outline[label]).area >= 0.5 * 32 * 32  # inside its region
        if m["slide_path"] == "caseA.tif":  # never a mixed tile
            assert box.intersection(wrong).area <= 0.01 * 32 * 32
        pixels = slides[m["slide_path"][:-4]]
        assert np.array_equal(tile, pixels[y:y + 32, x:x + 32])  # cut from there, as it is
        assert m["image_path"] == f"{m['slide_path']}#{m['region']}"


def test_imagescope_and_qupath_regions_cut_the_same_tiles(raw, tmp_path) -> None:
    """The same regions (a Benign one with a hole, an Invasive one in two parts) drawn in both
    formats over caseA give the same tiles of the same classes."""
    parts = [rectangle(352, 32, 480, 224), rectangle(480, 32, 600, 128)]
    qupath = write_qupath_geojson(tmp_path / "a.geojson", [
        ("b", "Benign", [BENIGN]), ("i", "Invasive", [[part] for part in parts])])
    imagescope = write_imagescope_xml(tmp_path / "a.xml", {
        "Benign": [(BENIGN[0], False), (BENIGN[1], True)],
        "Invasive": [(part, False) for part in parts]})
    tiles = {}
    with open_slide(raw / "caseA.tif") as slide:
        for name, path in (("qupath", qupath), ("imagescope", imagescope)):
            plan = plan_regions(slide, path.read_bytes(), path.name, PARAMS)
            tiles[name] = [(int(i), plan.regions[r].label)
                           for i, r in zip(plan.tiles.indices, plan.tiles.region, strict=True)]
    assert tiles["qupath"] == tiles["imagescope"]
    assert {label for _, label in tiles["qupath"]} == {"Benign", "Invasive"}


def test_bad_annotations_one_line_each(tmp_path, caplog) -> None:
    pixels = bach_image("Benign", 4)  # 256 x 192
    for name in ("lonely", "broken", "allbad", "bowtie", "two"):
        write_slide(tmp_path / f"{name}.tif", pixels, mpp=0.5)
    (tmp_path / "orphan.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    (tmp_path / "broken.geojson").write_text('{"type": "FeatureCollection", "features": [')
    write_imagescope_xml(tmp_path / "allbad.xml", {"": [(rectangle(10, 10, 200, 180), False)]})
    write_qupath_geojson(tmp_path / "bowtie.geojson", [
        ("x", "Benign", [[[(0, 0), (256, 192), (256, 0), (0, 192), (0, 0)]]])])
    for suffix in (".geojson", ".xml"):
        shutil.copy(tmp_path / "bowtie.geojson", tmp_path / f"two{suffix}")
    (tmp_path / "notes.txt").write_text("")
    with caplog.at_level(logging.WARNING):
        manifest, rejected = build_image_manifest(tmp_path, PARAMS)
    reasons = dict(zip(rejected["file"], rejected["reason"], strict=True))
    assert reasons["orphan.geojson"].startswith("annotations without a slide: no slide named "
                                                "'orphan'")
    assert reasons["lonely.tif"].startswith("slide without annotations: a slide outside class "
                                            "folders needs its regions beside it")
    assert reasons["broken.geojson"].startswith("unreadable annotations: not valid GeoJSON")
    assert reasons["broken.tif"] == ("no usable region: its annotations 'broken.geojson' "
                                     "cannot be read")
    assert reasons["allbad.xml"].startswith("region refused: region '1.1': no class")
    assert reasons["allbad.tif"].startswith("no usable region: every region was refused (1; "
                                            "see the lines of 'allbad.xml')")
    assert reasons["two.tif"] == ("several annotation files: two.geojson, two.xml; keep one")
    assert reasons["notes.txt"].startswith("not inside a class folder")
    assert all("\n" not in r for r in reasons.values())
    assert manifest["image_path"].tolist() == ["bowtie.tif#x"]  # repaired, kept, and said so
    warning = [r.getMessage() for r in caplog.records if "bowtie.geojson" in r.getMessage()]
    assert warning == ["Annotations 'bowtie.geojson', region 'x': Self-intersection[128 96]; "
                       "repaired with shapely.make_valid"]


def test_nothing_usable_stops_with_the_reasons(tmp_path) -> None:
    write_slide(tmp_path / "case.tif", bach_image("Benign", 4), mpp=0.5)
    write_qupath_geojson(tmp_path / "case.geojson", [
        ("a", "Stroma", [[rectangle(10, 10, 200, 180)]])])
    with pytest.raises(NoUsableImagesError, match=r"case\.tif: no usable region: every region "
                                                  r"was refused"):
        build_image_manifest(tmp_path, PARAMS)


def test_annotations_changed_after_the_manifest_write_nothing(raw, tmp_path) -> None:
    copy = tmp_path / "raw"
    copy.mkdir()
    for name in ("caseA.tif", "caseA.geojson"):
        shutil.copy(raw / name, copy / name)
    manifest, _ = build_image_manifest(copy, PARAMS)
    write_qupath_geojson(copy / "caseA.geojson", [("b1", "Invasive", [BENIGN])])
    with pytest.raises(RawDataChangedError, match=r"caseA\.geojson.*changed since the image "
                                                  r"manifest"):
        next(iter(tile_images(copy, manifest, PARAMS)))


def _written_an_hour_ago(path: Path) -> None:
    old = path.stat().st_mtime - 3600
    os.utime(path, (old, old))


def test_slide_changed_after_the_manifest_write_nothing(raw, tmp_path) -> None:
    copy = tmp_path / "raw"
    copy.mkdir()
    for name in ("caseA.tif", "caseA.geojson"):
        shutil.copy(raw / name, copy / name)
    _written_an_hour_ago(copy / "caseA.tif")  # its hash is kept for tiling
    manifest, _ = build_image_manifest(copy, PARAMS)
    data = bytearray((copy / "caseA.tif").read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    (copy / "caseA.tif").write_bytes(bytes(data))
    with pytest.raises(RawDataChangedError, match=r"caseA\.tif.*changed since the image "
                                                  r"manifest"):
        next(iter(tile_images(copy, manifest, PARAMS)))


@pytest.mark.parametrize("workers", [1, 2])
def test_each_slide_is_hashed_once_per_ingestion(raw, tmp_path, monkeypatch, workers) -> None:
    """Listing hashes each slide (on a worker process with several), and tiling checks it
    against the manifest without reading it again; the annotations are read whole each time."""
    copy = tmp_path / "raw"
    for name in ("caseA.tif", "caseA.geojson"):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(raw / name, copy / name)
    (copy / "Benign" / "P1").mkdir(parents=True)
    shutil.copy(raw / "caseB.tif", copy / "Benign" / "P1" / "caseB.tif")  # a slide, no regions
    for slide in ("caseA.tif", "Benign/P1/caseB.tif"):  # a file just written is hashed again
        _written_an_hour_ago(copy / slide)
    real = manifest_module.hashlib.sha256
    chunked: list[int] = []

    def counting(*args, **kwargs):  # sha256() with no data: file_sha256, reading a file
        if not args and not kwargs:
            chunked.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(manifest_module.hashlib, "sha256", counting)
    settings = PARAMS.model_copy(update={"workers": workers})
    manifest, _ = build_image_manifest(copy, settings)
    assert len(chunked) == (2 if workers == 1 else 0)  # on the workers with 2
    tiles = list(tile_images(copy, manifest, settings))
    assert len(chunked) == (2 if workers == 1 else 0)
    assert {m["image_path"].split("#")[0] for _, m in tiles} == {"caseA.tif",
                                                                 "Benign/P1/caseB.tif"}


@pytest.mark.integration
def test_annotated_slides_through_ingestion_and_splitting(kedro_project, run_kedro) -> None:
    """`kedro run` (env tiny: 128 px tiles) on the BACH subset plus an annotated slide at the
    top of the raw folder: its regions come back from the catalog as strings, its tiles stay
    in one split with the slide as their patient."""
    raw = kedro_project / "data" / "01_raw" / "images"
    pixels = side_by_side([bach_image("Benign", 5, 4), bach_image("Invasive", 5, 4)], margin=32)
    write_slide(raw / "case 7.tif", pixels, mpp=0.5)  # 1088 x 448: images of 512 x 384
    write_qupath_geojson(raw / "case 7.geojson", [
        ("1", "Benign", [[rectangle(32, 32, 544, 416)]]),
        ("2", "Invasive", [[rectangle(576, 32, 1088, 416)]])])
    run_kedro("ingestion")
    run_kedro("splitting")
    bootstrap_project(kedro_project)
    with KedroSession.create(project_path=kedro_project, env="tiny") as session:
        catalog = session.load_context().catalog
        manifest, store = catalog.load("image_manifest"), catalog.load("tiles")
        split = catalog.load("split_table")
    rows = manifest[manifest["slide_path"] == "case 7.tif"]
    assert rows["region"].tolist() == ["1", "2"] and rows["group"].eq("case 7.tif").all()
    tiles = store.index[store.index["slide_path"] == "case 7.tif"]
    assert set(tiles["region"]) == {"1", "2"} and len(tiles) == rows["n_tiles"].sum() > 0
    assert (tiles["label"] == tiles["region"].map({"1": "Benign", "2": "Invasive"})).all()
    assert split[split["group"] == "case 7.tif"]["split"].nunique() == 1


def test_group_pattern_finds_the_patient_in_the_slide_name(tmp_path) -> None:
    """Two slides of patient P7 share a group; a slide the pattern misses is one line."""
    pixels = bach_image("Benign", 4)  # 256 x 192
    for stem in ("P7_a", "P7_b", "x"):
        write_slide(tmp_path / f"{stem}.tif", pixels, mpp=0.5)
        write_qupath_geojson(tmp_path / f"{stem}.geojson", [
            ("r", "Benign", [[rectangle(0, 0, 256, 192)]])])
    settings = PARAMS.model_copy(update={"group_pattern": r"^(?P<group>P\d+)_"})
    manifest, rejected = build_image_manifest(tmp_path, settings)
    assert dict(zip(manifest["image_path"], manifest["group"], strict=True)) == {
        "P7_a.tif#r": "P7", "P7_b.tif#r": "P7"}
    assert rejected.set_index("file").loc["x.tif", "reason"].startswith(
        r"group_pattern does not match: '^(?P<group>P\d+)_' finds no patient")


def test_openslide_and_tiffslide_cut_the_same_tiles(raw, tmp_path, monkeypatch) -> None:
    pytest.importorskip("openslide", reason="OpenSlide is in the dev extra")
    copy = tmp_path / "raw"
    copy.mkdir()
    for name in ("caseB.tif", "caseB.xml"):
        shutil.copy(raw / name, copy / name)
    cut = {}
    for reader in ("openslide", "tiffslide"):
        monkeypatch.setenv(READER_VARIABLE, reader)
        manifest, _ = build_image_manifest(copy, PARAMS)
        cut[reader] = list(tile_images(copy, manifest, PARAMS))
    assert len(cut["openslide"]) == len(cut["tiffslide"]) > 20
    for (a, meta_a), (b, meta_b) in zip(cut["openslide"], cut["tiffslide"], strict=True):
        assert meta_a == meta_b and np.array_equal(a, b)
