"""A versioned folder of PNG pictures (e.g. one Grad-CAM overlay per predicted image).

Why not ``PartitionedDataset``: it cannot be versioned, and reporting artifacts here never
replace an earlier run's. Like ``PartitionedDataset``, saving takes ``{name: picture}`` where a
picture may be a zero-argument callable, called only when that file is written, so a node can
hand over thousands of pictures without holding them in memory. A callable returning None is
skipped (it could not draw its picture).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from kedro.io.core import DatasetError, Version
from PIL import Image

from .local_versioned import LocalVersionedDataset

logger = logging.getLogger(__name__)

SUFFIX = ".png"


def _safe_name(name: str) -> PurePosixPath:
    path = PurePosixPath(str(name).replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise DatasetError(f"Picture name '{name}' must be a relative path without '..'.")
    return path if path.suffix.lower() == SUFFIX else path.with_name(path.name + SUFFIX)


def save_picture(picture: Any, path: Path) -> None:
    """Writes a PIL image or a uint8 ``[H, W, 3]`` array as PNG (folders made as needed)."""
    if isinstance(picture, np.ndarray):
        picture = Image.fromarray(picture)
    if not isinstance(picture, Image.Image):
        raise DatasetError(f"Cannot save {type(picture).__name__} as '{path}': expected a PIL "
                           "image or a uint8 array.")
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")


class PngFolderDataset(LocalVersionedDataset):
    """``save({relative_name: picture_or_callable})`` writes ``<folder>/<name>.png`` files;
    ``load()`` returns ``{name: callable}`` that opens each PNG as a PIL image on demand."""

    def __init__(
        self,
        filepath: str,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
    ):
        super().__init__(filepath, version, metadata)

    @staticmethod
    def _is_complete(path: str) -> bool:
        return Path(path).is_dir()

    def load(self) -> dict[str, Callable[[], Any]]:
        root = self._load_path()

        def opener(path: Path) -> Callable[[], Any]:
            def open_png() -> Any:
                with Image.open(path) as image:
                    image.load()
                    return image

            return open_png

        return {
            p.relative_to(root).as_posix(): opener(p) for p in sorted(root.rglob(f"*{SUFFIX}"))
        }

    def save(self, data: Mapping[str, Any]) -> None:
        root = self._save_path()
        names = {name: _safe_name(name) for name in data}
        if len(set(names.values())) != len(names):
            raise DatasetError("Two pictures map to the same file name.")
        root.mkdir(parents=True, exist_ok=True)  # an empty version is still a version
        saved = 0
        for name, item in data.items():
            picture = item() if callable(item) else item
            if picture is None:  # the producer could not draw this one (and said why)
                continue
            save_picture(picture, root / names[name])
            saved += 1
        logger.info("Saved %d pictures to '%s'", saved, root)
