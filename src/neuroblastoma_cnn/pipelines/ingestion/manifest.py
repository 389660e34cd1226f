"""The image manifest: each candidate inspected (hash, size, tissue), duplicates resolved, and
the summary and warnings a run logs about it.

Kept apart from ``nodes.py``: what makes an image usable and how copies and conflicts are
rejected is the manifest's own logic; the node only feeds it candidates on worker threads.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from neuroblastoma_cnn.core.errors import DataError
from neuroblastoma_cnn.images.decoding import ImageRejected, Reason
from neuroblastoma_cnn.images.slides import (
    is_slide,
    open_slide,
    slide_grid,
    tissue_fractions,
)
from neuroblastoma_cnn.params import IngestionParams

from .scanning import LAYOUT_HINT, Candidate

#: Logged under the node module's name, as before the split (log filters and tests see it).
logger = logging.getLogger("neuroblastoma_cnn.pipelines.ingestion.nodes")

MANIFEST_COLUMNS = [
    "image_path", "label", "group", "width", "height", "mode", "sha256", "bytes",
    "n_tiles", "n_tiles_background", "max_tissue_fraction",
]
#: Added to the manifest only when it lists a slide (crop-only manifests keep their columns).
SLIDE_MANIFEST_COLUMNS = ["slide", "mpp", "levels", "tile_px", "read_level"]
#: Added after those when it lists an annotated slide (one row per region: ``annotated.py``).
ANNOTATION_MANIFEST_COLUMNS = ["slide_path", "region", "annotations", "annotations_sha256",
                               "n_tiles_mixed"]
REJECTED_COLUMNS = ["file", "reason"]
#: Bytes read at a time to hash a file. 1 MiB rather than 16: a 16 MiB chunk is a fresh
#: allocation whose pages fault in on every read, a third more CPU time to hash a 0.6 GB slide
#: (0.76 s against 0.50 s of CPU on a 2-vCPU Xeon).
HASH_CHUNK = 1 << 20

T = TypeVar("T")
R = TypeVar("R")




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


class RawDataChangedError(DataError):
    """Raised when a raw file no longer matches the manifest it was listed in."""


def read_verified(path: Path, sha256: str, whole: bool) -> bytes:
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


#: What :func:`file_sha256` hashed in this process: the file's stamp -> ``(sha256, bytes)``.
#: Only files last written more than ``_SETTLED_NS`` before are kept: file times are coarse
#: (a clock tick), so a file written again within the tick of its last write, at the same size,
#: would keep its stamp (git's "racily clean" files).
_SETTLED_NS = 2_000_000_000
_HASHED: dict[tuple[int, ...], tuple[str, int]] = {}


def _stamp(path: Path) -> tuple[int, ...]:
    """What identifies one state of a file: device, inode, size, modification and change
    times (a write changes the last two; the change time cannot be set back)."""
    info = path.stat()
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def file_sha256(path: Path) -> tuple[str, int]:
    """SHA-256 and size of a file read in chunks (a slide may be larger than memory).

    Hashed once per run: a file this process (or a worker whose hashes it kept, see
    :func:`hashes_kept`) hashed before, and whose stamp has not changed since, is not read
    again; so ingestion reads a slide once to list it, and tiling checks it against the
    manifest without a second pass over it. A file that changed while it was read, or was
    written in the last two seconds, is not kept (it is read again next time).
    """
    before = _stamp(path)
    if (known := _HASHED.get(before)) is not None:
        return known
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    result = digest.hexdigest(), size
    if _stamp(path) == before and time.time_ns() - before[3] > _SETTLED_NS:
        _HASHED[before] = result
    return result


def hashes_kept(fn: Callable[[T], R], item: T) -> tuple[R, dict[tuple[int, ...], tuple[str, int]]]:
    """``fn(item)`` on a worker process, with what :func:`file_sha256` hashed meanwhile, for
    :func:`keep_hashes` in the main process (where tiling checks the files again)."""
    before = set(_HASHED)
    result = fn(item)
    return result, {stamp: known for stamp, known in _HASHED.items() if stamp not in before}


def keep_hashes(hashed: Mapping[tuple[int, ...], tuple[str, int]]) -> None:
    """Adds a worker's hashes (from :func:`hashes_kept`) to this process's."""
    _HASHED.update(hashed)


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


def manifest_rows(by_hash: Mapping[str, list[Candidate]],
                  results: Mapping[str, dict[str, Any] | str], sizes: Mapping[str, int],
                  rejected: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """One manifest row per distinct content (``by_hash``: its copies), from the first copy's
    inspection ``results``; copies of a kept image are rejected as duplicates, and all copies
    of a content found under several classes as a label conflict (appended to ``rejected``)."""
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
    return rows


def manifest_tables(rows: list[dict[str, Any]], threshold: float,
                    rejected: list[tuple[str, str]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(manifest, rejected)`` tables: the manifest sorted by image, with the slide columns
    when it lists a slide; images without a tile at ``threshold`` are listed as rejected too
    (they stay in the manifest with ``n_tiles`` 0)."""
    has_slides = any(row.get("slide") for row in rows)
    has_regions = any(row.get("region") is not None for row in rows)
    columns = (MANIFEST_COLUMNS + (SLIDE_MANIFEST_COLUMNS if has_slides else [])
               + (ANNOTATION_MANIFEST_COLUMNS if has_regions else []))
    manifest = pd.DataFrame(rows, columns=columns)
    if has_slides:
        manifest["slide"] = manifest["slide"].eq(True)
    if has_regions:
        manifest["n_tiles_mixed"] = manifest["n_tiles_mixed"].astype("Int64")
    manifest = manifest.sort_values("image_path", ignore_index=True)
    for row in manifest.itertuples():
        if row.n_tiles == 0:
            rejected.append((row.image_path, (
                f"{Reason.BACKGROUND}: no tile with tissue fraction >= {threshold} "
                f"(best {row.max_tissue_fraction:.2f}); kept in the manifest with n_tiles 0")))
    rejected_df = pd.DataFrame(sorted(rejected), columns=REJECTED_COLUMNS)
    return manifest, rejected_df
