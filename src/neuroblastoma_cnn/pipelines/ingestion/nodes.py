"""Ingestion: find every raw image, check it, and cut it into tissue tiles.

The nodes here walk the raw folder, report every file they cannot use, and stream the tiles of
the usable ones into the tile store. How an image is decoded, what counts as tissue and how tiles
are cut live in :mod:`neuroblastoma_cnn.imaging`, because prediction must treat new images the
same way; the tile store records those settings (:class:`~neuroblastoma_cnn.preprocessing.
Preprocessing`), and the trained model carries them on.

Background-only images (no tile kept) stay in the manifest with ``n_tiles = 0`` (they are valid
images) and are also listed in the rejected list, because they give no training tile.

Both nodes decode images on ``workers`` processes (:func:`~neuroblastoma_cnn.parallel.
ordered_map`): results are consumed in file order, so the manifest and the tile store are the
same bytes as with one process, and only a few images are in flight at once, so memory does not
grow with the number of images.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from neuroblastoma_cnn.core.errors import DataError
from neuroblastoma_cnn.core.params import IngestionParams
from neuroblastoma_cnn.core.preprocessing import Preprocessing
from neuroblastoma_cnn.datasets import TileStream
from neuroblastoma_cnn.images.decoding import ImageRejected, Reason, decode_scaled, is_hidden
from neuroblastoma_cnn.images.slides import (
    SLIDE_EXTENSIONS,
    chosen_tiles,
    is_slide,
    iter_slide_tiles,
    open_slide,
    slide_grid,
    tissue_fractions,
)
from neuroblastoma_cnn.runtime.parallel import ordered_map, resolve_workers

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "image_path", "label", "group", "width", "height", "mode", "sha256", "bytes",
    "n_tiles", "n_tiles_background", "max_tissue_fraction",
]
#: Added to the manifest only when it lists a slide (crop-only manifests keep their columns).
SLIDE_MANIFEST_COLUMNS = ["slide", "mpp", "levels", "tile_px", "read_level"]
REJECTED_COLUMNS = ["file", "reason"]
HASH_CHUNK = 16 << 20
LAYOUT_HINT = "<CLASS>/<file> or <CLASS>/<PATIENT>/<file>"


class NoUsableImagesError(DataError):
    """Raised when a raw folder yields nothing to train on; says what was expected and where."""


class RawDataChangedError(DataError):
    """Raised when a raw file no longer matches the manifest it was listed in."""


# ----------------------------------------------------------------------------- scanning


@dataclass(frozen=True)
class Candidate:
    """A file with an image extension in the expected layout, not yet decoded."""

    path: Path
    rel: str
    label: str
    group: str


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
    for entry in _entries(root):
        is_dir = entry.is_dir()
        if is_hidden(entry.name):
            scan.reject(entry.name + ("/" if is_dir else ""), Reason.HIDDEN)
        elif not is_dir:
            scan.reject(entry.name, f"{Reason.OUTSIDE_CLASS}: expected {LAYOUT_HINT}")
        else:
            scan.class_folder(Path(entry.path), entry.name)
    return scan.candidates, scan.rejected


@dataclass
class _Scan:
    settings: IngestionParams
    candidates: list[Candidate] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)

    def reject(self, rel: str, reason: str) -> None:
        self.rejected.append((rel, reason))

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
        pattern = self.settings.group_regex
        if patient is not None:
            group = patient
        elif pattern is not None:
            match = pattern.search(path.name)
            if not match or not match.group("group"):
                self.reject(rel, f"{Reason.NO_GROUP}: '{pattern.pattern}' finds no patient in "
                                 "the file name; add a patient folder or fix the pattern")
                return 1
            group = match.group("group")
        else:
            group = rel  # no patient information: each image is its own group
        self.candidates.append(Candidate(path, rel, label, group))
        return 1


# ----------------------------------------------------------------------------- manifest


def inspect_image(data: bytes, name: str, settings: IngestionParams) -> dict[str, Any]:
    """Decodes and checks one image; returns its manifest fields or raises ImageRejected."""
    tiling = settings.tiling
    decoded = settings.image_checks.decode_for(data, name, tiling)
    scores = tiling.score(decoded)
    kept = sum(fraction >= tiling.min_tissue_fraction for _, _, fraction in scores)
    return {
        "width": decoded.width,
        "height": decoded.height,
        "mode": decoded.mode,
        "n_tiles": kept,
        "n_tiles_background": len(scores) - kept,
        "max_tissue_fraction": round(max((f for _, _, f in scores), default=0.0), 4),
    }


def inspect_slide(path: Path, name: str, settings: IngestionParams) -> dict[str, Any]:
    """Opens one slide, measures tissue on a low-resolution level; its manifest fields or
    ImageRejected. No full-resolution pixel is read."""
    tiling = settings.tiling
    with open_slide(path, name) as slide:
        grid = slide_grid(slide, tiling)
        fractions = tissue_fractions(slide, grid, tiling)
        width, height = slide.dimensions
        kept = int(np.count_nonzero(fractions >= tiling.min_tissue_fraction))
        return {
            "width": width, "height": height, "mode": "RGB", "n_tiles": kept,
            "n_tiles_background": len(fractions) - kept,
            "max_tissue_fraction": round(float(fractions.max(initial=0.0)), 4),
            "slide": True, "mpp": grid.mpp, "levels": len(slide.level_dimensions),
            "tile_px": grid.side0, "read_level": grid.read_level,
        }


def file_sha256(path: Path) -> tuple[str, int]:
    """SHA-256 and size of a file read in chunks (a slide may be larger than memory)."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _inspect_slide_file(
    settings: IngestionParams, candidate: Candidate
) -> tuple[str | None, int, dict[str, Any] | str]:
    try:
        digest, size = file_sha256(candidate.path)
    except OSError as exc:
        return None, 0, f"{Reason.NOT_AN_IMAGE}: cannot read file ({exc})"
    try:
        return digest, size, inspect_slide(candidate.path, candidate.rel, settings)
    except ImageRejected as exc:
        return digest, size, exc.reason


def _inspect_file(
    settings: IngestionParams, candidate: Candidate
) -> tuple[str | None, int, dict[str, Any] | str]:
    """One candidate on a worker: ``(sha256, bytes, manifest fields or rejection reason)``;
    ``sha256`` is None when the file cannot be read."""
    if is_slide(candidate.path):
        return _inspect_slide_file(settings, candidate)
    try:
        data = candidate.path.read_bytes()
    except OSError as exc:
        return None, 0, f"{Reason.NOT_AN_IMAGE}: cannot read file ({exc})"
    digest = hashlib.sha256(data).hexdigest()
    try:
        return digest, len(data), inspect_image(data, candidate.rel, settings)
    except ImageRejected as exc:
        return digest, len(data), exc.reason


def build_image_manifest(
    raw_root: str | os.PathLike[str], params: IngestionParams
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Checks every file under the raw folder; returns ``(manifest, rejected)``.

    The manifest has one row per usable image (``image_path, label, group, width, height,
    mode, sha256`` plus tile counts); the rejected list has ``file, reason`` for everything
    else. Files are read one at a time, and never written.
    """
    root = Path(raw_root)
    settings = params
    extensions = sorted(settings.image_checks.normalised_extensions)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise NoUsableImagesError(
            f"Raw image folder '{root}' {what}. Expected images as '{root}/{LAYOUT_HINT}' "
            f"(extensions {', '.join(extensions)})."
        )
    candidates, rejected = scan_raw_folder(root, settings)
    candidates = subset_per_class(candidates, settings.max_images_per_class,
                                  settings.subset_seed)

    # Copies of one content share the first copy's result (and its rejection).
    by_hash: dict[str, list[Candidate]] = defaultdict(list)
    results: dict[str, dict[str, Any] | str] = {}
    sizes: dict[str, int] = {}
    inspected = ordered_map(partial(_inspect_file, settings), candidates,
                            resolve_workers(settings.workers))
    with closing(inspected):
        for candidate, (digest, size, result) in zip(candidates, inspected, strict=True):
            if digest is None:
                rejected.append((candidate.rel, str(result)))
                continue
            by_hash[digest].append(candidate)
            sizes[candidate.rel] = size
            results.setdefault(digest, result)

    rows: list[dict[str, Any]] = []
    for digest, copies in by_hash.items():
        result = results[digest]
        if isinstance(result, str):
            rejected.extend((c.rel, result) for c in copies)
            continue
        labels = sorted({c.label for c in copies})
        if len(labels) > 1:
            where = ", ".join(sorted(c.rel for c in copies))
            reason = (f"{Reason.LABEL_CONFLICT}: identical bytes under classes "
                      f"{', '.join(labels)} ({where}); all copies rejected")
            rejected.extend((c.rel, reason) for c in copies)
            continue
        kept, *others = sorted(copies, key=lambda c: c.rel)
        rejected.extend(
            (c.rel, f"{Reason.DUPLICATE}: identical bytes to '{kept.rel}' (that copy is kept)")
            for c in others
        )
        rows.append({"image_path": kept.rel, "label": kept.label, "group": kept.group,
                     "sha256": digest, "bytes": sizes[kept.rel], **result})

    has_slides = any(row.get("slide") for row in rows)
    columns = MANIFEST_COLUMNS + (SLIDE_MANIFEST_COLUMNS if has_slides else [])
    manifest = pd.DataFrame(rows, columns=columns)
    if has_slides:
        manifest["slide"] = manifest["slide"].eq(True)
    manifest = manifest.sort_values("image_path", ignore_index=True)
    threshold = settings.tiling.min_tissue_fraction
    for row in manifest.itertuples():
        if row.n_tiles == 0:
            rejected.append((row.image_path, (
                f"{Reason.BACKGROUND}: no tile with tissue fraction >= {threshold} "
                f"(best {row.max_tissue_fraction:.2f}); kept in the manifest with n_tiles 0")))
    rejected_df = pd.DataFrame(sorted(rejected), columns=REJECTED_COLUMNS)

    _log_manifest_summary(root, manifest, rejected_df)
    if manifest.empty:
        raise NoUsableImagesError(_nothing_usable_message(root, settings, rejected_df))
    _warn_about_layout(manifest, settings)
    return manifest, rejected_df


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


def _log_manifest_summary(root: Path, manifest: pd.DataFrame, rejected: pd.DataFrame) -> None:
    accepted = manifest.groupby("label").size().to_dict() if not manifest.empty else {}
    by_class = Counter(str(f).split("/", 1)[0] for f in rejected["file"] if "/" in str(f))
    classes = sorted(set(accepted) | set(by_class))
    per_class = ", ".join(f"{c} {accepted.get(c, 0)}/{by_class.get(c, 0)}" for c in classes)
    logger.info(
        "Image manifest of '%s': %d images accepted, %d entries rejected; per class "
        "accepted/rejected: %s", root, len(manifest), len(rejected), per_class or "none",
    )
    if not rejected.empty:
        kinds = Counter(_reason_kind(r) for r in rejected["reason"])
        logger.warning(
            "Rejected %d entries (listed in 'rejected_images'): %s", len(rejected),
            ", ".join(f"{n} {kind}" for kind, n in kinds.most_common()),
        )
        for file, reason in rejected.head(20).itertuples(index=False):
            logger.debug("Rejected '%s': %s", file, reason)
    for label in classes:
        if label not in accepted and label in by_class:
            logger.warning("Class folder '%s' has no usable image; it is left out", label)
    if not manifest.empty:
        background = manifest.loc[manifest["n_tiles"] == 0, "image_path"].tolist()
        if background:
            logger.warning(
                "%d images have no tile with enough tissue; they stay in the manifest with "
                "n_tiles 0 but give no tile: %s%s", len(background), ", ".join(background[:10]),
                " ..." if len(background) > 10 else "",
            )
        logger.info(
            "Tiles expected: %d kept, %d dropped as background",
            int(manifest["n_tiles"].sum()), int(manifest["n_tiles_background"].sum()),
        )


def _nothing_usable_message(
    root: Path, settings: IngestionParams, rejected: pd.DataFrame
) -> str:
    extensions = ", ".join(sorted(settings.image_checks.normalised_extensions))
    message = (
        f"No usable images in raw folder '{root}'. Expected TIFF, PNG, JPEG or BMP files "
        f"({extensions}) as '{root}/{LAYOUT_HINT}'."
    )
    if rejected.empty:
        return message + " The folder is empty."
    examples = "; ".join(f"{f}: {r}" for f, r in rejected.head(10).itertuples(index=False))
    more = f" (and {len(rejected) - 10} more)" if len(rejected) > 10 else ""
    return f"{message} All {len(rejected)} entries were rejected: {examples}{more}"


def _warn_about_layout(manifest: pd.DataFrame, settings: IngestionParams) -> None:
    # A group (slide, patient) may hold images of several classes; each image keeps its one
    # label and splitting keeps the group whole (see pipelines/splitting).
    n_labels = manifest.groupby("group")["label"].nunique()
    spanning = sorted(map(str, n_labels.index[n_labels > 1]))
    if spanning:
        logger.info(
            "%d of %d groups hold images of several classes (e.g. %s); each stays whole in one "
            "split", len(spanning), len(n_labels), ", ".join(spanning[:3]),
        )
    if manifest["label"].nunique() < 2:
        logger.warning(
            "Only one class has usable images (%s); a classifier needs at least two",
            ", ".join(manifest["label"].unique()),
        )
    if settings.tiling.tile_size is None:
        ratio = manifest["width"] / manifest["height"]
        skewed = int(((ratio < 0.9) | (ratio > 1.1)).sum())
        if skewed:
            logger.warning(
                "%d images are not square; with tile_size null each is resized whole to "
                "%dx%d, which distorts it. Set ingestion.tile_size to cut square tiles.",
                skewed, settings.tiling.input_size, settings.tiling.input_size,
            )


# ----------------------------------------------------------------------------- tiles


def tile_images(
    raw_root: str | os.PathLike[str], manifest: pd.DataFrame, params: IngestionParams
) -> TileStream:
    """Returns a lazy stream of the kept tiles of every manifest image, for the tile store.

    Images are decoded one at a time while the store is written, so memory does not grow
    with the data set. Each tile carries ``image_path, label, group, x, y, tissue_fraction``.
    """
    root = Path(raw_root)
    tiling = params.tiling
    missing = {"image_path", "label", "group", "sha256"} - set(manifest.columns)
    if missing:
        raise DataError(f"Image manifest lacks columns {sorted(missing)}; rebuild it.")
    images = manifest
    if "n_tiles" in manifest.columns:
        images = manifest[manifest["n_tiles"].astype(int) > 0]
    if images.empty:
        raise NoUsableImagesError(
            f"No image in '{root}' has a tile with tissue fraction >= "
            f"{tiling.min_tissue_fraction} (see 'rejected_images'); lower "
            "ingestion.min_tissue_fraction or check the images."
        )
    classes = sorted(str(label) for label in images["label"].unique())
    lost = sorted(set(map(str, manifest["label"])) - set(classes))
    if lost:
        logger.warning("Classes with images but no tissue tile, left out: %s", ", ".join(lost))
    rows = [
        (str(r.image_path), str(r.label), str(r.group), str(r.sha256))
        for r in images.itertuples(index=False)
    ]
    record = Preprocessing(classes=classes, image_checks=params.image_checks, tiling=tiling,
                           architecture=None)
    metadata = {**record.to_dict(), "n_images": len(rows), "shard_size": params.shard_size}
    slides = (set(map(str, images.loc[images["slide"].astype(bool), "image_path"]))
              if "slide" in images.columns else set())
    return TileStream(_tile_records(root, rows, params, slides), metadata)


@dataclass(frozen=True)
class _ImageTiles:
    """The kept tiles of one image (computed on a worker) and its grid size."""

    tiles: np.ndarray  # uint8 [n, input_size, input_size, 3]
    positions: list[tuple[int, int]]
    fractions: list[float]
    n_grid: int


def _read_verified(path: Path, sha256: str, whole: bool) -> bytes:
    """The file's bytes (``whole``; else only its hash is checked, in chunks), or
    RawDataChangedError if it cannot be read or no longer matches the manifest."""
    try:
        data = path.read_bytes() if whole else b""
        digest = hashlib.sha256(data).hexdigest() if whole else file_sha256(path)[0]
    except OSError as exc:
        raise RawDataChangedError(
            f"'{path}' is in the image manifest but cannot be read ({exc}); "
            "rerun the ingestion pipeline."
        ) from exc
    if digest != sha256:
        raise RawDataChangedError(
            f"'{path}' changed since the image manifest was built (sha256 differs); "
            "rerun the ingestion pipeline."
        )
    return data


def _tile_file(root: Path, settings: IngestionParams, slides: set[str],
               row: tuple[str, str, str, str]) -> _ImageTiles | None:
    """Reads, verifies and tiles one manifest image (on a worker process); None for a slide,
    whose tiles are streamed by :func:`_slide_tiles` instead (they may not fit in memory)."""
    image_path, _, _, sha256 = row
    if image_path in slides:
        return None
    path = root / PurePosixPath(image_path)
    data = _read_verified(path, sha256, whole=True)
    tiling = settings.tiling
    decoded = decode_scaled(data, str(path), settings.max_image_pixels, tiling.reduction)
    del data
    kept = tiling.tile(decoded)
    size = tiling.input_size
    tiles = (np.stack([t.tile for t in kept]) if kept
             else np.zeros((0, size, size, 3), np.uint8))
    return _ImageTiles(tiles, [(t.x, t.y) for t in kept], [t.tissue_fraction for t in kept],
                       len(tiling.positions(decoded.width, decoded.height)))


def _slide_tiles(root: Path, settings: IngestionParams, row: tuple[str, str, str, str]
                 ) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """The kept tiles of one slide, read one at a time, each with its level-0 position, the
    level it was read from, its edge in level-0 pixels and the slide's microns per pixel."""
    image_path, label, group, sha256 = row
    path = root / PurePosixPath(image_path)
    _read_verified(path, sha256, whole=False)
    tiling = settings.tiling
    try:
        with open_slide(path, str(path)) as slide:
            grid = slide_grid(slide, tiling)
            fractions = tissue_fractions(slide, grid, tiling)
            indices, _ = chosen_tiles(fractions, tiling.min_tissue_fraction, None)
            for tile in iter_slide_tiles(slide, grid, fractions, indices, tiling.input_size):
                yield tile.tile, {
                    "image_path": image_path, "label": label, "group": group,
                    "x": tile.x, "y": tile.y, "tissue_fraction": round(tile.tissue_fraction, 4),
                    "level": grid.read_level, "tile_px": grid.side0, "mpp": grid.mpp,
                }
    except ImageRejected as exc:  # it passed the manifest's checks: it changed or is damaged
        raise RawDataChangedError(f"{exc}; rerun the ingestion pipeline.") from exc


def _tile_records(
    root: Path, rows: list[tuple[str, str, str, str]], settings: IngestionParams,
    slides: set[str],
) -> Callable[[], Iterator[tuple[np.ndarray, dict[str, Any]]]]:
    workers = resolve_workers(settings.workers)

    def records() -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        kept: Counter[str] = Counter()
        dropped: Counter[str] = Counter()
        tiled = ordered_map(partial(_tile_file, root, settings, slides), rows, workers)
        with closing(tiled):
            for row, image in zip(rows, tiled, strict=True):
                image_path, label, group, _ = row
                if image is None:  # a slide: streamed here, tile by tile
                    for record in _slide_tiles(root, settings, row):
                        kept[label] += 1
                        yield record
                    continue
                for tile, (x, y), fraction in zip(image.tiles, image.positions, image.fractions,
                                                  strict=True):
                    yield tile, {
                        "image_path": image_path, "label": label, "group": group,
                        "x": x, "y": y, "tissue_fraction": round(fraction, 4),
                    }
                kept[label] += len(image.positions)
                dropped[label] += image.n_grid - len(image.positions)
        logger.info(
            "Tiled %d images on %d worker(s): %d tiles kept, %d dropped as background; per "
            "class kept/dropped: %s", len(rows), workers, sum(kept.values()),
            sum(dropped.values()),
            ", ".join(f"{c} {kept[c]}/{dropped[c]}" for c in sorted(set(kept) | set(dropped))),
        )

    return records
