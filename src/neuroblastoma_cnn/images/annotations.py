"""Annotated regions of a slide as pathologists draw them: QuPath GeoJSON and Aperio ImageScope
XML in, QuPath GeoJSON out (the predictions a slide's tiles got, as QuPath imports them).

Coordinates are level-0 pixels with the origin at the top-left corner in both formats (QuPath:
"Units and origin" of its export docs; ImageScope: ``Vertex X Y``), as in
:mod:`~neuroblastoma_cnn.images.slides`. Geometry is shapely's; no polygon code here.

Decisions:

- QuPath: a ``FeatureCollection`` (``File > Export objects as GeoJSON``), a bare list of
  features (QuPath 0.2) or one feature. Only ``annotation`` objects are regions (a missing
  ``objectType`` is an annotation, as QuPath reads it); detections, cells and tiles are counted
  and skipped. The class is ``classification.name`` (``names`` of a derived class joined with
  ": ", QuPath's own spelling). The region id is the object's ``id`` (QuPath's UUID), else
  ``feature <n>`` (1-based place in the file).
- ImageScope: ``Annotations/Annotation/Regions/Region/Vertices/Vertex``. The class is the
  annotation layer's ``Name`` (``annotation_name``) or the region's ``Text``
  (``region_text``): ``ingestion.imagescope_class``. Region id: ``<annotation Id>.<region
  Id>``. A negative region (``NegativeROA="1"``, ImageScope's negative pen) is cut out of the
  other regions of its layer. A region of two vertices is a rectangle (``Type="1"``) or an
  ellipse (``Type="2"``) spanning them; arrows and rulers have no area and are refused.
- Repair, not refusal: a ring that does not close is closed, and a polygon that intersects
  itself is repaired with ``shapely.make_valid`` (its polygonal part kept); both are reported
  (``Annotations.repaired``) for a WARNING naming the file and region. A region left with no
  area, or that is not an area (a point, a line), is refused with its id.
- A file that is not JSON / XML, or not in either layout, is :class:`AnnotationsRejected`:
  one line naming it.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import shapely
from shapely import affinity
from shapely.geometry import box, mapping, shape
from shapely.geometry.base import BaseGeometry

from neuroblastoma_cnn.core.types import ImageScopeClass
from neuroblastoma_cnn.images.rejection import ImageRejected, Reason

#: Files read as annotations beside a slide (``<slide stem>`` or ``<slide name>`` + suffix).
ANNOTATION_SUFFIXES = (".geojson", ".json", ".xml")
#: Vertices of the polygon an ImageScope ellipse becomes.
ELLIPSE_VERTICES = 64


class AnnotationsRejected(ImageRejected):
    """An annotation file that cannot be read at all (``reason`` starts with "unreadable
    annotations")."""


def _unreadable(name: str, detail: str) -> AnnotationsRejected:
    return AnnotationsRejected(name, f"{Reason.ANNOTATIONS_UNREADABLE}: {detail}")


@dataclass(frozen=True)
class Region:
    """One annotated region: its id (for messages and the tiles cut from it), class (None when
    the annotation has none) and geometry (Polygon or MultiPolygon, level-0 pixels)."""

    id: str
    label: str | None
    geometry: BaseGeometry


@dataclass
class Annotations:
    """What one annotation file holds: its regions, the regions refused (``(id, why)``), those
    repaired (``(id, what)``) and the other objects skipped (QuPath detections...)."""

    file: str
    regions: list[Region] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    repaired: list[tuple[str, str]] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)

    def add(self, region_id: str, label: str | None, geometry: BaseGeometry,
            unclosed: bool = False) -> None:
        """Checks one region's geometry: keeps it (repaired if need be) or refuses it."""
        if unclosed:
            self.repaired.append((region_id, "a ring does not close; closed"))
        if not geometry.is_valid and geometry.geom_type in ("Polygon", "MultiPolygon"):
            reason = shapely.is_valid_reason(geometry)
            geometry = shapely.make_valid(geometry)
            self.repaired.append((region_id, f"{reason}; repaired with shapely.make_valid"))
        polygonal, why = _polygonal(geometry)
        if polygonal is None:
            self.refused.append((region_id, why))
            return
        self.regions.append(Region(region_id, label, polygonal))


def _polygonal(geometry: BaseGeometry) -> tuple[BaseGeometry | None, str]:
    """The polygonal part of a geometry, or None with why it has none."""
    if geometry.geom_type == "GeometryCollection":
        parts = [g for g in geometry.geoms if g.geom_type in ("Polygon", "MultiPolygon")]
        geometry = shapely.union_all(parts) if parts else shapely.Polygon()
    if geometry.geom_type not in ("Polygon", "MultiPolygon"):
        return None, f"not an area ({geometry.geom_type})"
    if geometry.is_empty or geometry.area <= 0:
        return None, "no area (its vertices enclose nothing)"
    return geometry, ""


def annotation_files(slide: Path) -> list[Path]:
    """The annotation files beside a slide: ``<stem>`` or ``<name>`` with an annotation
    suffix (``case.geojson`` or ``case.svs.geojson`` for ``case.svs``), sorted."""
    names = {f"{base}{suffix}" for base in (slide.stem, slide.name)
             for suffix in ANNOTATION_SUFFIXES}
    return sorted(slide.parent / name for name in names if (slide.parent / name).is_file())


def read_annotations(data: bytes, name: str, imagescope_class: ImageScopeClass
                     ) -> Annotations:
    """The regions of an annotation file's bytes (GeoJSON or ImageScope XML, told apart by
    content); :class:`AnnotationsRejected` if it is neither."""
    text = data.lstrip()
    if text.startswith(b"<"):
        return read_imagescope_xml(data, name, imagescope_class)
    return read_qupath_geojson(data, name)


# ----------------------------------------------------------------------------- QuPath GeoJSON


def read_qupath_geojson(data: bytes, name: str,
                        object_types: Iterable[str] = ("annotation",)) -> Annotations:
    """The regions of a QuPath GeoJSON export (objects of ``object_types`` only)."""
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _unreadable(name, f"not valid GeoJSON ({exc})") from exc
    features = _features(document, name)
    wanted = set(object_types)
    found = Annotations(name)
    seen: Counter[str] = Counter()
    for n, feature in enumerate(features, start=1):
        if not isinstance(feature, Mapping):
            found.refused.append((f"feature {n}", "not a GeoJSON feature"))
            continue
        properties = feature.get("properties") or {}
        object_type = str(properties.get("objectType") or properties.get("object_type")
                          or properties.get("type") or "annotation")
        if object_type not in wanted:
            found.skipped[object_type] += 1
            continue
        region_id = str(feature.get("id") or f"feature {n}")
        seen[region_id] += 1
        if seen[region_id] > 1:  # two objects with one id: both kept, told apart
            region_id = f"{region_id} ({seen[region_id]})"
        _add_feature(found, region_id, feature, properties)
    return found


def _features(document: Any, name: str) -> list[Any]:
    if isinstance(document, list):
        return document
    if isinstance(document, Mapping) and document.get("type") == "FeatureCollection" \
            and isinstance(document.get("features"), list):
        return document["features"]
    if isinstance(document, Mapping) and document.get("type") == "Feature":
        return [document]
    raise _unreadable(name, "not a GeoJSON FeatureCollection, feature list or feature "
                            "(QuPath: File > Export objects as GeoJSON)")


def _add_feature(found: Annotations, region_id: str, feature: Mapping[str, Any],
                 properties: Mapping[str, Any]) -> None:
    raw = feature.get("geometry")
    try:
        geometry = shape(raw)
    except Exception as exc:  # shapely raises ValueError, TypeError, GEOSException...
        found.refused.append((region_id, f"geometry cannot be read ({exc})"))
        return
    found.add(region_id, classification_name(properties.get("classification")), geometry,
              unclosed=_has_open_ring(raw))


def classification_name(classification: Any) -> str | None:
    """A QuPath classification's name (``{"name": ...}``, ``{"names": [...]}`` of a derived
    class, or a plain string); None when there is none."""
    if isinstance(classification, str):
        label = classification
    elif isinstance(classification, Mapping):
        names = classification.get("names")
        label = (": ".join(map(str, names)) if isinstance(names, list) and names
                 else str(classification.get("name") or ""))
    else:
        return None
    return label.strip() or None


def _has_open_ring(geometry: Any) -> bool:
    """Whether a GeoJSON (Multi)Polygon has a ring whose last vertex is not its first."""
    if not isinstance(geometry, Mapping):
        return False
    kind, coordinates = geometry.get("type"), geometry.get("coordinates") or []
    polygons = [coordinates] if kind == "Polygon" else coordinates if kind == "MultiPolygon" \
        else []
    return any(len(ring) > 1 and list(ring[0]) != list(ring[-1])
               for polygon in polygons for ring in polygon)


# ----------------------------------------------------------------------------- ImageScope XML


def read_imagescope_xml(data: bytes, name: str, imagescope_class: ImageScopeClass
                        ) -> Annotations:
    """The regions of an Aperio ImageScope annotation file."""
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError as exc:
        raise _unreadable(name, f"not valid XML ({exc})") from exc
    if root.tag != "Annotations":
        raise _unreadable(name, f"not ImageScope XML (root element <{root.tag}>, not "
                                "<Annotations>)")
    found = Annotations(name)
    for layer_number, layer in enumerate(root.iter("Annotation"), start=1):
        layer_id = layer.get("Id") or str(layer_number)
        positive: list[tuple[str, str | None, BaseGeometry]] = []
        negative: list[BaseGeometry] = []
        for number, region in enumerate(layer.iter("Region"), start=1):
            region_id = f"{layer_id}.{region.get('Id') or number}"
            geometry, why = _region_geometry(region)
            if geometry is None:
                found.refused.append((region_id, why))
            elif region.get("NegativeROA") == "1":
                negative.append(shapely.make_valid(geometry))
            else:
                source = layer.get("Name") if imagescope_class == "annotation_name" \
                    else region.get("Text")
                positive.append((region_id, (source or "").strip() or None, geometry))
        cut = shapely.union_all(negative) if negative else None
        for region_id, label, geometry in positive:
            found.add(region_id, label, geometry if cut is None
                      else shapely.make_valid(geometry).difference(cut))
    return found


def _region_geometry(region: ElementTree.Element) -> tuple[BaseGeometry | None, str]:
    try:
        points = [(float(v.attrib["X"]), float(v.attrib["Y"])) for v in region.iter("Vertex")]
    except (KeyError, ValueError) as exc:
        return None, f"a vertex has no numeric X and Y ({exc})"
    if not all(math.isfinite(c) for point in points for c in point):
        return None, "a vertex is not a finite number"
    kind = region.get("Type", "0")
    if len(points) == 2 and kind in ("1", "2"):
        (x0, y0), (x1, y1) = points
        rectangle = box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        if kind == "1":
            return rectangle, ""
        centre = rectangle.centroid.buffer(1.0, quad_segs=ELLIPSE_VERTICES // 4)
        return affinity.scale(centre, abs(x1 - x0) / 2, abs(y1 - y0) / 2), ""
    if len(points) < 3:
        return None, f"not an area ({len(points)} vertices, region type {kind})"
    return shapely.Polygon(points), ""


# ----------------------------------------------------------------------------- GeoJSON out


def qupath_feature(geometry: BaseGeometry, object_type: str, label: str | None = None,
                   color: Sequence[int] | None = None,
                   measurements: Mapping[str, float] | None = None,
                   **properties: Any) -> dict[str, Any]:
    """One GeoJSON feature as QuPath writes and reads it: ``objectType``, ``classification``
    ``{"name", "color": [r, g, b]}`` and ``measurements`` (a name -> number map, QuPath 0.4+);
    other ``properties`` (``name``, ``isLocked``, ``metadata``...) as given."""
    props: dict[str, Any] = {"objectType": object_type}
    if label is not None:
        props["classification"] = {"name": label, **({"color": [int(c) for c in color]}
                                                     if color is not None else {})}
    props.update(properties)
    if measurements:
        props["measurements"] = {key: float(value) for key, value in measurements.items()}
    return {"type": "Feature", "geometry": mapping(geometry), "properties": props}


def feature_collection(features: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": list(features)}
