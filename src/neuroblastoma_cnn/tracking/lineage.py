"""Lineage: which versions every saved data artifact was made from, and a check that a node's
inputs share one lineage.

Each versioned output gets a small ``lineage.json`` inside its own version folder (e.g.
``data/05_model_input/split_table.csv/<version>/lineage.json``)::

    {"dataset": "split_table", "version": "...", "node": "check_no_leakage",
     "inputs": {"tiles": "<v1>"},                      # what the node loaded
     "made_from": {"tiles": "<v1>", "image_manifest": "<v0>"}}   # inputs and their ancestors

Why stop instead of loading the matching versions: Kedro loads each dataset's newest version on
its own, so rerunning `ingestion` alone leaves a new `tiles` beside a `split_table` cut from the
old one. Silently pinning older versions would train on data the user did not ask for (and hide
that the newest tiles were never split); one line that names both versions and the command that
remakes them together keeps the choice with the user, who may also pin versions with
``--load-versions``. Artifacts made before lineage was recorded have no ``lineage.json`` and
are taken as they are.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kedro.io.core import AbstractVersionedDataset, DatasetError, VersionNotFoundError

from neuroblastoma_cnn.core.errors import DataError
from neuroblastoma_cnn.core.storage import FsPath

logger = logging.getLogger(__name__)

LINEAGE_FILE = "lineage.json"
RERUN_DATA = "kedro run --pipeline=data_processing"


def version_folder(dataset: Any, version: str) -> Path | FsPath | None:
    """``<filepath>/<version>/``: where a versioned dataset keeps ``version`` (an
    :class:`FsPath` on a remote fsspec file system); None for datasets that are not versioned."""
    if not isinstance(dataset, AbstractVersionedDataset) or not dataset._version:
        return None
    protocol = getattr(dataset, "_protocol", "file")
    try:
        path = dataset._get_versioned_path(version)
    except (DatasetError, TypeError, ValueError):
        return None
    if protocol in ("file", None):
        return Path(str(path)).parent
    fs = getattr(dataset, "_fs", None)
    return FsPath(fs, str(path), protocol).parent if fs is not None else None


def load_version(dataset: Any) -> str | None:
    """The version ``dataset`` loads (pinned or latest), None if unversioned or absent."""
    if not isinstance(dataset, AbstractVersionedDataset):
        return None
    try:
        return dataset.resolve_load_version()
    except (VersionNotFoundError, DatasetError):
        return None


def read_lineage(folder: Path | FsPath | None) -> dict[str, Any] | None:
    """The lineage recorded in a version folder, None if there is none (or it is unreadable)."""
    if folder is None:
        return None
    path = folder / LINEAGE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("Ignoring unreadable lineage file '%s': %s", path, exc)
        return None


def write_lineage(folder: Path | FsPath, record: Mapping[str, Any]) -> Path | FsPath:
    """Writes ``lineage.json`` into a version folder (never over an existing one)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LINEAGE_FILE
    with path.open("x") as out:
        json.dump(dict(record), out, indent=2, sort_keys=True)
    return path


def made_from(inputs: Mapping[str, str], lineages: Mapping[str, Mapping[str, Any] | None]
              ) -> dict[str, str]:
    """The inputs' versions plus every version they were made from."""
    ancestors: dict[str, str] = {}
    for record in lineages.values():
        if record:
            ancestors.update(record.get("made_from") or {})
    ancestors.update(inputs)
    return dict(sorted(ancestors.items()))


def check_same_lineage(
    versions: Mapping[str, str], lineages: Mapping[str, Mapping[str, Any] | None], where: str,
) -> None:
    """Raises DataError when two inputs disagree on the version of a dataset.

    ``versions``: each input's loaded version; ``lineages``: each input's recorded lineage.
    An input claims its own version; a recorded lineage claims the versions it was made from.
    """
    claims: dict[str, dict[str, list[str]]] = {}  # dataset -> version -> [who says so]
    for name, version in versions.items():
        claims.setdefault(name, {}).setdefault(version, []).append("")
    for name, record in lineages.items():
        for ancestor, version in ((record or {}).get("made_from") or {}).items():
            claims.setdefault(ancestor, {}).setdefault(version, []).append(name)
    for dataset, by_version in claims.items():
        if len(by_version) < 2:
            continue
        parts = []
        # The loaded version first, then the others by version.
        for version, sources in sorted(by_version.items(), key=lambda kv: ("" not in kv[1], kv[0])):
            made = sorted(s for s in sources if s)
            if "" in sources:
                parts.append(f"it loads {dataset} {version}")
            if made:
                verb = "was" if len(made) == 1 else "were"
                parts.append(f"{' and '.join(made)} {verb} made from {dataset} {version}")
        raise DataError(
            f"The inputs of {where} come from different versions of {dataset}: "
            + ", but ".join(parts),
            hint=f"rerun `{RERUN_DATA}` to remake them together, or pin matching versions with "
                 "--load-versions",
        )
