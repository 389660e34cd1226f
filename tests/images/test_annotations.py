"""Annotation files as QuPath and ImageScope write them: regions, classes, holes, negative
regions, repairs and refusals with the region's id; and which grid tiles a region holds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely

from neuroblastoma_cnn.images.annotations import (
    AnnotationsRejected,
    annotation_files,
    classification_name,
    feature_collection,
    qupath_feature,
    read_annotations,
    read_qupath_geojson,
)
from neuroblastoma_cnn.images.regions import tiles_in_regions, usable_regions


def square(x: float, y: float, side: float) -> list[list[float]]:
    return [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]


def feature(geometry: dict, label: str | None = "Tumor", object_type: str | None = "annotation",
            **extra: object) -> dict:
    properties: dict = {} if object_type is None else {"objectType": object_type}
    if label is not None:
        properties["classification"] = {"name": label, "color": [200, 0, 0]}
    return {"type": "Feature", **extra, "geometry": geometry, "properties": properties}


QUPATH = feature_collection([
    feature({"type": "Polygon", "coordinates": [square(0, 0, 100), square(40, 40, 20)]},
            id="5a1c0e8e-0000-4000-8000-000000000001"),  # a square with a hole
    feature({"type": "MultiPolygon", "coordinates": [[square(200, 0, 50)], [square(300, 0, 50)]]},
            label=None, object_type=None),  # no objectType: an annotation, as QuPath reads it
    feature({"type": "Polygon", "coordinates": [square(0, 200, 10)]}, object_type="detection"),
    feature({"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}),
    feature({"type": "Polygon", "coordinates": [square(500, 500, 40)[:-1]]}, label="Stroma"),
    feature({"type": "Point", "coordinates": [5, 5]}),
    feature({"type": "Polygon", "coordinates": "nonsense"}),
])


def test_qupath_regions_holes_repairs_and_refusals() -> None:
    found = read_annotations(json.dumps(QUPATH).encode(), "case.geojson", "annotation_name")
    ids = [r.id for r in found.regions]
    assert ids == ["5a1c0e8e-0000-4000-8000-000000000001", "feature 2", "feature 4",
                   "feature 5"]
    first, multi, bowtie, unclosed = found.regions
    assert first.label == "Tumor" and first.geometry.area == 100 * 100 - 20 * 20  # the hole
    assert multi.label is None and multi.geometry.geom_type == "MultiPolygon"
    assert bowtie.geometry.is_valid and bowtie.geometry.area == pytest.approx(50)
    assert unclosed.label == "Stroma" and unclosed.geometry.area == 1600
    assert found.skipped == {"detection": 1}
    repaired = dict(found.repaired)
    assert repaired["feature 4"].startswith("Self-intersection")
    assert "shapely.make_valid" in repaired["feature 4"]
    assert repaired["feature 5"] == "a ring does not close; closed"
    refused = dict(found.refused)
    assert refused["feature 6"] == "not an area (Point)"
    assert refused["feature 7"].startswith("geometry cannot be read")


@pytest.mark.parametrize(("data", "why"), [
    (b'{"type": "FeatureCollection", "features": [', "not valid GeoJSON"),
    (b'{"type": "Topology"}', "not a GeoJSON FeatureCollection"),
    (b"<Annotations><Annotation>", "not valid XML"),
    (b"<svg></svg>", "not ImageScope XML (root element <svg>"),
])
def test_an_unreadable_file_is_one_line_naming_it(data: bytes, why: str) -> None:
    with pytest.raises(AnnotationsRejected) as caught:
        read_annotations(data, "slides/case.geojson", "annotation_name")
    message = str(caught.value)
    assert "slides/case.geojson" in message and why in message and "\n" not in message
    assert caught.value.reason.startswith("unreadable annotations")


IMAGESCOPE = b"""<?xml version="1.0" encoding="UTF-8"?>
<Annotations MicronsPerPixel="0.252100">
<Annotation Id="1" Name="Tumor" LineColor="65280">
  <Attributes><Attribute Name="Description" Id="0" Value=""/></Attributes>
  <Regions>
    <RegionAttributeHeaders><AttributeHeader Id="9999" Name="Region"/></RegionAttributeHeaders>
    <Region Id="1" Type="0" Text="Stroma" NegativeROA="0">
      <Attributes/>
      <Vertices><Vertex X="0" Y="0" Z="0"/><Vertex X="100" Y="0" Z="0"/>
        <Vertex X="100" Y="100" Z="0"/><Vertex X="0" Y="100" Z="0"/></Vertices>
    </Region>
    <Region Id="2" Type="0" Text="" NegativeROA="1">
      <Vertices><Vertex X="10" Y="10"/><Vertex X="30" Y="10"/><Vertex X="30" Y="30"/>
        <Vertex X="10" Y="30"/></Vertices>
    </Region>
    <Region Id="3" Type="1" Text="Stroma"><Vertices><Vertex X="200" Y="0"/>
      <Vertex X="240" Y="50"/></Vertices></Region>
    <Region Id="4" Type="2" Text="Stroma"><Vertices><Vertex X="300" Y="0"/>
      <Vertex X="400" Y="50"/></Vertices></Region>
    <Region Id="5" Type="3" Text="Stroma"><Vertices><Vertex X="0" Y="0"/>
      <Vertex X="9" Y="9"/></Vertices></Region>
    <Region Id="6" Type="0" Text="Stroma"><Vertices><Vertex X="a" Y="0"/></Vertices></Region>
  </Regions>
  <Plots/>
</Annotation>
<Annotation Id="2" Name="" LineColor="255">
  <Regions><Region Id="1" Type="0" Text="Stroma"><Vertices><Vertex X="500" Y="500"/>
    <Vertex X="540" Y="500"/><Vertex X="540" Y="540"/></Vertices></Region></Regions>
</Annotation>
</Annotations>
"""


def test_imagescope_layers_negative_regions_and_shapes() -> None:
    by_layer = read_annotations(IMAGESCOPE, "case.xml", "annotation_name")
    regions = {r.id: r for r in by_layer.regions}
    assert list(regions) == ["1.1", "1.3", "1.4", "2.1"]
    assert regions["1.1"].label == "Tumor" and regions["2.1"].label is None  # unnamed layer
    assert regions["1.1"].geometry.area == 100 * 100 - 20 * 20  # the negative region cut out
    assert regions["1.3"].geometry.bounds == (200, 0, 240, 50)  # a rectangle of two corners
    ellipse = regions["1.4"].geometry  # an ellipse spanning its two vertices
    assert ellipse.bounds == pytest.approx((300, 0, 400, 50), abs=0.5)
    assert ellipse.area == pytest.approx(np.pi * 50 * 25, rel=0.01)
    refused = dict(by_layer.refused)
    assert refused["1.5"] == "not an area (2 vertices, region type 3)"
    assert refused["1.6"].startswith("a vertex has no numeric X and Y")
    by_text = read_annotations(IMAGESCOPE, "case.xml", "region_text")
    assert {r.id: r.label for r in by_text.regions} == {
        "1.1": "Stroma", "1.3": "Stroma", "1.4": "Stroma", "2.1": "Stroma"}


def test_regions_refused_for_class_and_bounds() -> None:
    found = read_annotations(json.dumps(QUPATH).encode(), "case.geojson", "annotation_name")
    kept, refused = usable_regions(found, 520, 520, ["Tumor", "Stroma"])
    assert [r.id for r in kept] == ["5a1c0e8e-0000-4000-8000-000000000001", "feature 4"]
    why = dict(refused)
    assert why["feature 2"].startswith("no class")
    assert why["feature 5"].startswith("coordinates outside the slide: (500, 500)-(540, 540) on "
                                       "a 520 x 520 px slide")
    assert why["feature 6"] == "not an area (Point)"  # the file's own refusals stay
    _, refused = usable_regions(found, 1000, 1000, ["Tumor"])
    assert dict(refused)["feature 5"] == ("class 'Stroma' is not in "
                                          "ingestion.annotation_classes (Tumor)")
    everything, _ = usable_regions(found, 1000, 1000, None)
    assert "feature 5" in [r.id for r in everything]  # any class without a configured list


def test_tiles_take_the_class_of_the_region_they_lie_in() -> None:
    """A 100 px Tumor square with a 20 px hole at (40, 40), a Stroma square from x=100, and a
    small Tumor square overlapping the Stroma one; 20 px tiles."""
    regions = read_qupath_geojson(json.dumps(feature_collection([
        feature({"type": "Polygon", "coordinates": [square(0, 0, 100), square(40, 40, 20)]}),
        feature({"type": "Polygon", "coordinates": [square(100, 0, 100)]}, label="Stroma"),
        feature({"type": "Polygon", "coordinates": [square(170, 60, 30)]}, id="inner"),
    ])).encode(), "x.geojson").regions
    positions = [(x, y) for y in range(0, 120, 20) for x in range(0, 220, 20)]
    found = tiles_in_regions(positions, 20, regions, min_fraction=0.5)
    tiles = {positions[i]: (regions[r].label, regions[r].id, f)
             for i, r, f in zip(found.indices, found.region, found.fraction, strict=True)}
    assert (40, 40) not in tiles  # the hole
    assert tiles[(0, 0)] == ("Tumor", "feature 1", 1.0)
    assert tiles[(100, 0)] == ("Stroma", "feature 2", 1.0)
    assert all(y < 100 and x < 200 for x, y in tiles)  # nothing outside the regions
    assert all(label == ("Tumor" if x < 100 else "Stroma")
               for (x, y), (label, _, _) in tiles.items() if (x, y) < (160, 60) or y < 60)
    mixed = {positions[i] for i in found.mixed}
    assert {(160, 60), (180, 60), (160, 80), (180, 80)} <= mixed  # Tumor inside Stroma
    assert not mixed & set(tiles)
    strict = tiles_in_regions([(90, 0), (95, 0)], 10, regions[:1], min_fraction=0.6)
    assert list(strict.indices) == [0] and strict.fraction[0] == 1.0  # (95, 0): half inside


def test_no_region_no_tile() -> None:
    empty = tiles_in_regions([(0, 0)], 10, [], 0.5)
    assert len(empty.indices) == len(empty.mixed) == 0


def test_qupath_features_written_read_back() -> None:
    shape = shapely.box(10, 20, 30, 40)
    written = feature_collection([qupath_feature(shape, "detection", "Benign", (0, 128, 255),
                                                 {"prob_Benign": 0.75}, name="tile")])
    again = read_qupath_geojson(json.dumps(written).encode(), "p.geojson",
                                object_types=("detection",))
    assert [(r.label, r.geometry.bounds) for r in again.regions] == [("Benign", (10, 20, 30, 40))]
    props = written["features"][0]["properties"]
    assert props["classification"] == {"name": "Benign", "color": [0, 128, 255]}
    assert props["measurements"] == {"prob_Benign": 0.75} and props["name"] == "tile"


def test_class_names_and_files_beside_a_slide(tmp_path) -> None:
    assert classification_name({"names": ["Tumor", "Positive"]}) == "Tumor: Positive"
    assert classification_name(" Stroma ") == "Stroma" and classification_name(None) is None
    slide = tmp_path / "case.svs"
    for name in ("case.geojson", "case.svs.xml", "other.xml", "case.txt"):
        (tmp_path / name).write_text("")
    assert [p.name for p in annotation_files(slide)] == ["case.geojson", "case.svs.xml"]
