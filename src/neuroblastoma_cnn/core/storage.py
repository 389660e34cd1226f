"""Paths on any fsspec file system (local, ``s3://``, ``gs://``, ``memory://``...).

Why a small path type of our own: the project's datasets and the sidecar files the hooks write
(``lineage.json``, ``promotion.json``) were written against :class:`pathlib.Path`. ``FsPath``
offers the few ``Path`` operations they use on top of an fsspec file system, so the same code
writes a sidecar beside a local version folder or beside an object in a bucket. Local paths stay
plain ``Path`` objects (:func:`as_path`), so local behaviour (atomic renames, memory-mapping)
is unchanged.
"""

from __future__ import annotations

import contextlib
import posixpath
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import IO, Any

from kedro.io.core import get_filepath_str


class FsPath:
    """A path on an fsspec file system: ``fs`` plus a path without the protocol."""

    def __init__(self, fs: Any, path: str, protocol: str) -> None:
        self.fs = fs
        self.path = str(path).rstrip("/") or "/"
        self.protocol = protocol

    def __truediv__(self, other: str) -> FsPath:
        return FsPath(self.fs, posixpath.join(self.path, str(other)), self.protocol)

    def __str__(self) -> str:
        return get_filepath_str(PurePosixPath(self.path), self.protocol)

    def __repr__(self) -> str:
        return f"FsPath('{self}')"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FsPath) and str(self) == str(other)

    def __lt__(self, other: FsPath) -> bool:
        return str(self) < str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def parent(self) -> FsPath:
        return FsPath(self.fs, posixpath.dirname(self.path), self.protocol)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    def with_name(self, name: str) -> FsPath:
        return self.parent / name

    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def is_file(self) -> bool:
        return bool(self.fs.isfile(self.path))

    def is_dir(self) -> bool:
        return bool(self.fs.isdir(self.path))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no folders: a no-op there (fsspec's makedirs is one too)."""
        with contextlib.suppress(FileExistsError):
            self.fs.makedirs(self.path, exist_ok=True)

    def open(self, mode: str = "r", **kwargs: Any) -> IO[Any]:
        """``mode='x'`` refuses an existing file (checked, then written: object stores have no
        exclusive create; the project writes each sidecar from one process)."""
        if "x" in mode:
            if self.exists():
                raise FileExistsError(str(self))
            mode = mode.replace("x", "w")
        return self.fs.open(self.path, mode, **kwargs)

    def read_text(self) -> str:
        with self.open("r") as handle:
            return handle.read()

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def write_text(self, text: str) -> int:
        with self.open("w") as handle:
            return handle.write(text)

    def write_bytes(self, data: bytes) -> int:
        with self.open("wb") as handle:
            return handle.write(data)

    def replace(self, target: FsPath) -> FsPath:
        self.fs.mv(self.path, target.path)
        return target

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rglob(self, pattern: str) -> list[FsPath]:
        """Files below this folder whose name matches ``pattern`` (e.g. ``*.png``), sorted."""
        found = self.fs.find(self.path)
        root = self.fs._strip_protocol(self.path)  # fsspec's own spelling of the folder
        return [FsPath(self.fs, p, self.protocol) for p in sorted(found)
                if fnmatch(posixpath.basename(p), pattern)
                and p.startswith(root)]

    def resolve(self) -> FsPath:
        return self

    def as_posix(self) -> str:
        return str(self)

    def relative_to(self, other: FsPath) -> PurePath:
        """The path below ``other``; ValueError (as ``Path``) when not below it."""
        if not isinstance(other, FsPath) or other.protocol != self.protocol:
            raise ValueError(f"'{self}' is not below '{other}'")
        root = other.fs._strip_protocol(other.path).rstrip("/") + "/"
        own = self.fs._strip_protocol(self.path)
        if not own.startswith(root):
            raise ValueError(f"'{self}' is not below '{other}'")
        return PurePath(own.removeprefix(root))

    def invalidate(self) -> None:
        """Forgets cached listings (s3fs caches them; a version just written must be seen)."""
        self.fs.invalidate_cache(self.path)


class PurePath(str):
    """A relative path from :meth:`FsPath.relative_to`, with ``as_posix`` like ``PurePath``."""

    def as_posix(self) -> str:
        return str(self)


def as_path(value: str | Path | FsPath) -> Path | FsPath:
    """A local path as :class:`Path`, an :class:`FsPath` unchanged."""
    return value if isinstance(value, FsPath) else Path(value)


def is_local(path: Path | FsPath) -> bool:
    return not isinstance(path, FsPath)
