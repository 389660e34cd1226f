"""Scanning the raw folder: which files are candidates, with their class and patient group.

Kept apart from ``nodes.py``: the folder layout rules (class folders, optional patient folders,
hidden files, the per-class subset) are read and changed on their own, before any pixel is read.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neuroblastoma_cnn.images.annotations import ANNOTATION_SUFFIXES, annotation_files
from neuroblastoma_cnn.images.decoding import ImageRejected, Reason, is_hidden
from neuroblastoma_cnn.images.slides import SLIDE_EXTENSIONS, is_slide
from neuroblastoma_cnn.params import IngestionParams

#: Logged under the node module's name, as before the split (log filters and tests see it).
logger = logging.getLogger("neuroblastoma_cnn.pipelines.ingestion.nodes")

LAYOUT_HINT = "<CLASS>/<file> or <CLASS>/<PATIENT>/<file>"


@dataclass(frozen=True)
class Candidate:
    """A file with an image extension in the expected layout, not yet decoded; an annotated
    slide (top level, ``annotations`` beside it) has no ``label``: its regions have classes."""

    path: Path
    rel: str
    label: str
    group: str
    annotations: Path | None = None


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    with os.scandir(folder) as it:
        return sorted(it, key=lambda entry: entry.name)


def subset_per_class(
    candidates: list[Candidate], max_per_class: int | None, seed: int
) -> list[Candidate]:
    """At most ``max_per_class`` candidates of each class, drawn at random with ``seed``.

    Why before decoding: the point is a quick run on a large set, so the files left out are
    never read. The draw depends only on the seed and the sorted file list, and the kept files
    stay in scan order.
    """
    if max_per_class is None:
        return candidates
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, candidate in enumerate(candidates):
        by_class[candidate.label].append(i)
    rng = np.random.default_rng(seed)
    keep: set[int] = set()
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda i: candidates[i].rel)
        if len(members) > max_per_class:
            members = [members[j] for j in rng.choice(len(members), max_per_class,
                                                      replace=False)]
        keep.update(members)
    if len(keep) < len(candidates):
        logger.info(
            "ingestion.max_images_per_class = %d (seed %d): using %d of %d image files; per "
            "class: %s", max_per_class, seed, len(keep), len(candidates),
            ", ".join(f"{label} {min(len(ids), max_per_class)}/{len(ids)}"
                      for label, ids in sorted(by_class.items())),
        )
    return [c for i, c in enumerate(candidates) if i in keep]


def scan_raw_folder(
    root: Path, settings: IngestionParams
) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """Lists every entry under ``root``: image candidates, and rejections with their reason.

    Walks the tree itself (rather than globbing for images) so that hidden files, stray files,
    empty folders and wrong extensions are reported, not silently skipped.
    """
    scan = _Scan(settings)
    top_files = []
    for entry in _entries(root):
        is_dir = entry.is_dir()
        if is_hidden(entry.name):
            scan.reject(entry.name + ("/" if is_dir else ""), Reason.HIDDEN)
        elif not is_dir:
            top_files.append(Path(entry.path))
        else:
            scan.class_folder(Path(entry.path), entry.name)
    scan.top_level(top_files)
    return scan.candidates, scan.rejected


@dataclass
class _Scan:
    settings: IngestionParams
    candidates: list[Candidate] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)

    def reject(self, rel: str, reason: str) -> None:
        self.rejected.append((rel, reason))

    def top_level(self, files: list[Path]) -> None:
        """Files outside class folders: a slide with one annotation file beside it is an
        annotated slide; a slide without one, an annotation file without a slide and any other
        file are rejected, each with its reason."""
        slides = [p for p in files if p.suffix.lower() not in ANNOTATION_SUFFIXES and is_slide(p)]
        claimed: set[Path] = set()
        for path in slides:
            found = annotation_files(path)
            claimed.update(found)
            if len(found) > 1:
                self.reject(path.name, f"{Reason.SEVERAL_ANNOTATIONS}: "
                                       f"{', '.join(p.name for p in found)}; keep one")
            elif not found:
                self.reject(path.name, (
                    f"{Reason.NO_ANNOTATIONS}: a slide outside class folders needs its regions "
                    f"beside it ({path.stem}.geojson from QuPath or {path.stem}.xml from "
                    f"ImageScope); else put it in a class folder, {LAYOUT_HINT}"))
            elif (group := self.group_of(path, path.name, None)) is not None:
                self.candidates.append(Candidate(path, path.name, "", group, found[0]))
        for path in files:
            if path in claimed or path in slides:
                continue
            if path.suffix.lower() in ANNOTATION_SUFFIXES:
                self.reject(path.name, f"{Reason.ORPHAN_ANNOTATIONS}: no slide named "
                                       f"'{path.stem}' or '{path.stem}.<ext>' beside it")
            else:
                self.reject(path.name, f"{Reason.OUTSIDE_CLASS}: expected {LAYOUT_HINT}")

    def group_of(self, path: Path, rel: str, patient: str | None) -> str | None:
        """The patient group: the patient folder, else ``group_pattern``'s match in the file
        name (None, the file rejected, when it finds none), else the file itself."""
        pattern = self.settings.group_regex
        if patient is not None:
            return patient
        if pattern is None:
            return rel  # no patient information: each image is its own group
        match = pattern.search(path.name)
        if not match or not match.group("group"):
            self.reject(rel, f"{Reason.NO_GROUP}: '{pattern.pattern}' finds no patient in "
                             "the file name; add a patient folder or fix the pattern")
            return None
        return match.group("group")

    def class_folder(self, folder: Path, label: str) -> None:
        n_images = 0
        for entry in _entries(folder):
            rel = f"{label}/{entry.name}"
            is_dir = entry.is_dir()
            if is_hidden(entry.name):
                self.reject(rel + ("/" if is_dir else ""), Reason.HIDDEN)
            elif is_dir:
                n_images += self.patient_folder(Path(entry.path), label, entry.name)
            else:
                n_images += self.file(Path(entry.path), rel, label, None)
        if n_images == 0:
            self.reject(f"{label}/", f"{Reason.EMPTY_CLASS}: no image files")

    def patient_folder(self, folder: Path, label: str, patient: str) -> int:
        n_images = 0
        for entry in _entries(folder):
            rel = f"{label}/{patient}/{entry.name}"
            if is_hidden(entry.name):
                self.reject(rel + ("/" if entry.is_dir() else ""), Reason.HIDDEN)
            elif entry.is_dir():
                self.reject(f"{rel}/", f"{Reason.TOO_DEEP}: expected {LAYOUT_HINT}; not read")
            else:
                n_images += self.file(Path(entry.path), rel, label, patient)
        if n_images == 0:
            self.reject(f"{label}/{patient}/", f"{Reason.EMPTY_PATIENT}: no image files")
        return n_images

    def file(self, path: Path, rel: str, label: str, patient: str | None) -> int:
        """Adds a file as a candidate if its extension says image; 1 if it has one, else 0."""
        try:
            if path.suffix.lower() not in SLIDE_EXTENSIONS:  # slides: whatever `extensions`
                self.settings.image_checks.check_extension(path.name)
        except ImageRejected as exc:
            self.reject(rel, exc.reason)
            return 0
        group = self.group_of(path, rel, patient)
        if group is not None:
            self.candidates.append(Candidate(path, rel, label, group))
        return 1
