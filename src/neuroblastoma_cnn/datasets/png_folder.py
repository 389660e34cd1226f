"""Versioned folders of files, one per item: PNG pictures (e.g. one Grad-CAM overlay per
predicted image) and GeoJSON documents (one per predicted slide, for QuPath).

Why not ``PartitionedDataset``: it cannot be versioned, and reporting artifacts here never
replace an earlier run's. Like ``PartitionedDataset``, saving takes ``{name: item}`` where an
item may be a zero-argument callable, called only when that file is written, so a node can
hand over thousands of pictures without holding them in memory. A callable returning None is
skipped (it could not draw its picture).
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from kedro.io.core import DatasetError, Version
from PIL import Image

from neuroblastoma_cnn.core.storage import FsPath, is_local

from .local_versioned import LocalVersionedDataset

logger = logging.getLogger(__name__)

SUFFIX = ".png"
EMPTY_MARK = ".empty"  # on object stores, where a folder exists only through its files


def _safe_name(name: str, suffix: str = SUFFIX) -> PurePosixPath:
    path = PurePosixPath(str(name).replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise DatasetError(f"File name '{name}' must be a relative path without '..'.")
    return path if path.suffix.lower() == suffix else path.with_name(path.name + suffix)


def save_picture(picture: Any, path: Path | FsPath) -> None:
    """Writes a PIL image or a uint8 ``[H, W, 3]`` array as PNG (folders made as needed)."""
    if isinstance(picture, np.ndarray):
        picture = Image.fromarray(picture)
    if not isinstance(picture, Image.Image):
        raise DatasetError(f"Cannot save {type(picture).__name__} as '{path}': expected a PIL "
                           "image or a uint8 array.")
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_local(path):
        picture.save(path, format="PNG")
        return
    with path.open("wb") as out:
        picture.save(out, format="PNG")


class _FolderDataset(LocalVersionedDataset):
    """``save({relative_name: item_or_callable})`` writes ``<folder>/<name><suffix>`` files;
    ``load()`` returns ``{name: callable}`` that reads each file on demand."""

    suffix = SUFFIX
    what = "pictures"

    def __init__(
        self,
        filepath: str,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
    ):
        super().__init__(filepath, version, metadata, credentials, fs_args)

    def _is_complete(self, path: str) -> bool:
        # Object stores have no empty folders: an empty version keeps a marker file there.
        return bool(self._fs.isdir(path) or self._fs.exists(posixpath.join(path, EMPTY_MARK)))

    def _write(self, item: Any, path: Path | FsPath) -> None:
        raise NotImplementedError

    def _read(self, path: Path | FsPath) -> Any:
        raise NotImplementedError

    def load(self) -> dict[str, Callable[[], Any]]:
        root = self._load_path()
        return {p.relative_to(root).as_posix(): partial(self._read, p)
                for p in sorted(root.rglob(f"*{self.suffix}"))}

    def save(self, data: Mapping[str, Any]) -> None:
        root = self._save_path()
        names = {name: _safe_name(name, self.suffix) for name in data}
        if len(set(names.values())) != len(names):
            raise DatasetError(f"Two {self.what} map to the same file name.")
        root.mkdir(parents=True, exist_ok=True)  # an empty version is still a version
        saved = 0
        for name, item in data.items():
            value = item() if callable(item) else item
            if value is None:  # the producer could not make this one (and said why)
                continue
            self._write(value, root / str(names[name]))
            saved += 1
        if not self.is_local:
            if not saved:
                (root / EMPTY_MARK).write_text("")
            self._invalidate_cache()
        logger.info("Saved %d %s to '%s'", saved, self.what, root)


class PngFolderDataset(_FolderDataset):
    """A versioned folder of PNG pictures: PIL images or uint8 arrays in, PIL images out."""

    def _write(self, item: Any, path: Path | FsPath) -> None:
        save_picture(item, path)

    def _read(self, path: Path | FsPath) -> Any:
        source = path if is_local(path) else io.BytesIO(path.read_bytes())
        with Image.open(source) as image:
            image.load()
            return image


class GeoJsonFolderDataset(_FolderDataset):
    """A versioned folder of GeoJSON documents (``<name>.geojson``): dicts in, dicts out."""

    suffix = ".geojson"
    what = "GeoJSON files"

    def _write(self, item: Any, path: Path | FsPath) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(item))

    def _read(self, path: Path | FsPath) -> Any:
        return json.loads(path.read_text())
