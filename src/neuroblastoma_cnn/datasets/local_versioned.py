"""The base of this project's file and folder datasets: local or fsspec paths, versioned like
Kedro's own.

Each subclass says how to read and write its artifact and what marks a complete one
(``_is_complete``); resolving versions, building the file system from ``credentials`` /
``fs_args`` and answering ``exists`` is written once here, as kedro-datasets' own datasets do
(``s3://``, ``gs://``, ``abfs://``, ``memory://``... through fsspec). Local paths come back as
:class:`pathlib.Path` (so subclasses keep atomic renames and memory-mapped reads), remote ones
as :class:`neuroblastoma_cnn.core.storage.FsPath`.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
from kedro.io.core import (
    AbstractVersionedDataset,
    DatasetError,
    Version,
    get_filepath_str,
    get_protocol_and_path,
)

from neuroblastoma_cnn.core.storage import FsPath


class LocalVersionedDataset(AbstractVersionedDataset[Any, Any]):
    """A versioned dataset at a local or remote path; subclasses implement ``load``/``save``.

    ``credentials`` and ``fs_args`` go to ``fsspec.filesystem`` (e.g. ``key``/``secret``/
    ``client_kwargs: {endpoint_url: ...}`` for s3fs, ``token`` for gcsfs).
    """

    def __init__(
        self, filepath: str, version: Version | None = None,
        metadata: dict[str, Any] | None = None,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
    ):
        protocol, path = get_protocol_and_path(filepath, version)
        self._protocol = protocol
        self._storage_options = {**(credentials or {}), **(fs_args or {})}
        if protocol == "file":
            self._storage_options.setdefault("auto_mkdir", True)
        try:
            self._fs = fsspec.filesystem(protocol, **self._storage_options)
        except (ImportError, ValueError) as exc:  # e.g. s3fs / gcsfs not installed
            raise DatasetError(
                f"{type(self).__name__} cannot open '{filepath}': {exc}") from exc
        self.metadata = metadata
        super().__init__(filepath=PurePosixPath(path), version=version,
                         exists_function=self._complete_at, glob_function=self._fs.glob)

    @property
    def is_local(self) -> bool:
        return self._protocol == "file"

    def _complete_at(self, path: str) -> bool:
        return self._is_complete(str(self._as_path(path)))

    def _is_complete(self, path: str) -> bool:
        """Whether a complete artifact sits at ``path`` (a version counts only if so)."""
        return bool(self._fs.exists(path))

    def _as_path(self, path: Any) -> Path | FsPath:
        if self.is_local:
            return Path(get_filepath_str(PurePosixPath(path), self._protocol))
        return FsPath(self._fs, str(path), self._protocol)

    def _load_path(self) -> Path | FsPath:
        return self._as_path(self._get_load_path())

    def _save_path(self) -> Path | FsPath:
        return self._as_path(self._get_save_path())

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath, "protocol": self._protocol, "version": self._version}

    def _exists(self) -> bool:
        try:
            load_path = self._get_load_path()
        except DatasetError:
            return False
        return self._complete_at(str(load_path))

    def _invalidate_cache(self) -> None:
        """Drops fsspec's cached listings so a version just written is found (s3fs, gcsfs)."""
        self._fs.invalidate_cache(get_filepath_str(self._filepath, self._protocol))
