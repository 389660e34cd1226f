"""A read-only Kedro dataset for the raw image folder.

Why not a ``PartitionedDataset`` of images: the ingestion nodes must see everything in the
folder (hidden files, empty class folders, stray documents) to report it, and must read one
image at a time to keep memory bounded. So loading only hands over the folder's path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io.core import AbstractDataset, DatasetError


class ImageFolderDataset(AbstractDataset[Any, Path]):
    """Points at ``<root>/<CLASS>/[<PATIENT>/]<file>``; ``load`` returns the root ``Path``.

    Saving always fails: raw data is never written by a pipeline.
    """

    def __init__(self, path: str, metadata: dict[str, Any] | None = None):
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> Path:
        return self._path

    def save(self, data: Any) -> None:
        raise DatasetError(
            f"Cannot save to '{self._path}': raw data is read-only. Pipelines write their "
            "outputs to other catalog entries."
        )

    def _exists(self) -> bool:
        return self._path.is_dir()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}
