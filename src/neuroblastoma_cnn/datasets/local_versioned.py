"""The base of this project's file and folder datasets: local paths, versioned like Kedro's own.

Each subclass says how to read and write its artifact and what marks a complete one on disk
(``_is_complete``); resolving versions, refusing other protocols and answering ``exists`` is
written once here.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io.core import (
    AbstractVersionedDataset,
    DatasetError,
    Version,
    get_filepath_str,
    get_protocol_and_path,
)


class LocalVersionedDataset(AbstractVersionedDataset[Any, Any]):
    """A versioned dataset at a local path; subclasses implement ``load`` and ``save``."""

    def __init__(
        self, filepath: str, version: Version | None = None,
        metadata: dict[str, Any] | None = None,
    ):
        protocol, path = get_protocol_and_path(filepath, version)
        if protocol != "file":
            raise DatasetError(f"{type(self).__name__} takes local paths only, got '{filepath}'.")
        self._protocol = protocol
        self.metadata = metadata
        super().__init__(filepath=PurePosixPath(path), version=version,
                         exists_function=self._is_complete)

    @staticmethod
    def _is_complete(path: str) -> bool:
        """Whether a complete artifact sits at ``path`` (a version counts only if so)."""
        return Path(path).exists()

    def _load_path(self) -> Path:
        return Path(get_filepath_str(self._get_load_path(), self._protocol))

    def _save_path(self) -> Path:
        return Path(get_filepath_str(self._get_save_path(), self._protocol))

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath, "version": self._version}

    def _exists(self) -> bool:
        try:
            load_path = self._load_path()
        except DatasetError:
            return False
        return self._is_complete(str(load_path))
