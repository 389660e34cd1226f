"""A read-only Kedro dataset for an image archive on the web: download, verify, unpack once.

Why a dataset: the demo environment swaps the raw image folder for a public archive, and the
ingestion nodes must not know the difference. Loading hands over the unpacked image root, a
``Path``, exactly as :class:`~neuroblastoma_cnn.datasets.ImageFolderDataset` does.

What it guarantees:

- The archive is fetched with ``pooch`` (progress bar; the file is written under a temporary
  name and moved into place only once its MD5 matches), so a wrong checksum or an interrupted
  download never leaves a file a later run would trust. A zip placed at ``filepath`` by hand
  is used as is when its MD5 matches: no network.
- It is unpacked into a temporary sibling folder that is renamed to ``path`` only at the end,
  with a marker file holding the verified MD5. Later loads find the marker and use the folder
  without network; a folder without it (or with another MD5) is unpacked again.
- Failures are one :class:`~neuroblastoma_cnn.core.errors.DataError` that names the URL, the file
  path to place the zip at by hand and the MD5 it must have.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import pooch
import requests
from kedro.io.core import AbstractDataset, DatasetError

from neuroblastoma_cnn.core.errors import DataError, ParameterError

logger = logging.getLogger(__name__)

MARKER = ".verified.json"
_MD5 = re.compile(r"^[0-9a-f]{32}$")
_GOT_HASH = re.compile(r"but got ([0-9a-fA-F]+)")


class ArchiveError(DataError, DatasetError):
    """The archive cannot be downloaded, verified or unpacked.

    Also a ``DatasetError`` so that Kedro passes it on as is instead of wrapping its message
    in "Failed while loading data from dataset ...".
    """


class ArchiveParameterError(ParameterError, DatasetError):
    """The dataset's URL or MD5 is malformed (passed on by Kedro as is, like ArchiveError)."""


class RemoteArchiveDataset(AbstractDataset[Any, Path]):
    """``load`` returns ``<path>/<image_root>`` after making sure the verified archive is there.

    Args:
        url: where to download the zip from (``http(s)://``).
        md5: the zip's MD5, 32 hexadecimal digits, optionally written ``md5:<hash>``.
        filepath: local file path of the zip; a zip with the right MD5 put here by hand is
            used without network. (``filepath`` and ``path``: the keys Kedro anchors at the
            project root.)
        path: the folder the archive is unpacked into (created whole at the end, never in place).
        image_root: the folder inside the archive that holds the class folders (``None``: the
            archive's top level).
        attribution: text written to ``<path>/README.md`` (licence and citation of the data).
        hint: appended to download errors, e.g. how to point the URL at a mirror.
    """

    def __init__(
        self,
        *,
        url: str,
        md5: str,
        filepath: str,
        path: str,
        image_root: str | None = None,
        attribution: str | None = None,
        hint: str | None = None,
        metadata: dict[str, Any] | None = None,
    ):
        self._url = str(url or "")
        self._md5_raw = md5
        self._archive = Path(filepath)
        self._path = Path(path)
        self._image_root = PurePosixPath(image_root) if image_root else None
        if self._image_root is not None and (
            self._image_root.is_absolute() or ".." in self._image_root.parts
        ):
            raise DatasetError(f"image_root must be a relative path inside the archive, "
                               f"got '{image_root}'.")
        self._attribution = attribution
        self._hint = hint
        self.metadata = metadata

    # ------------------------------------------------------------------ Kedro interface

    def load(self) -> Path:
        md5 = self._md5()
        root = self._root(self._path)
        if not self._verified(md5):
            archive = self._download(md5)
            self._unpack(archive, md5)
        else:
            logger.info("Using the verified copy of '%s' in '%s'", self._url, self._path)
        if not root.is_dir():  # a verified copy is complete: the entry names a wrong folder
            raise ArchiveError(
                f"The verified copy of '{self._url}' in '{self._path}' has no folder "
                f"'{self._image_root}'; check image_root in the catalog"
            )
        return root

    def save(self, data: Any) -> None:
        raise DatasetError(
            f"Cannot save to '{self._path}': raw data is read-only. Pipelines write their "
            "outputs to other catalog entries."
        )

    def _exists(self) -> bool:
        """True only for a verified unpacked copy: checking never downloads."""
        try:
            return self._verified(self._md5()) and self._root(self._path).is_dir()
        except ParameterError:
            return False

    def _describe(self) -> dict[str, Any]:
        return {"url": self._url, "md5": self._md5_raw, "filepath": str(self._archive),
                "path": str(self._path)}

    # ------------------------------------------------------------------ steps

    def _md5(self) -> str:
        value = self._md5_raw
        if not isinstance(value, str):
            # `--params demo.md5=<digits>` is parsed as a number: leading zeros are lost.
            raise ArchiveParameterError(
                f"The MD5 for '{self._url}' was read as {type(value).__name__} {value!r}, "
                "not text; write it as md5:<32 hexadecimal digits>"
            )
        digest = value.strip().lower().removeprefix("md5:")
        if not _MD5.match(digest):
            raise ArchiveParameterError(
                f"The MD5 for '{self._url}' must be 32 hexadecimal digits (or md5:<hash>), "
                f"got {value!r}"
            )
        return digest

    def _root(self, folder: Path) -> Path:
        return folder / self._image_root if self._image_root else folder

    def _verified(self, md5: str) -> bool:
        """Whether ``path`` holds a complete unpack of the archive with this MD5 (the marker is
        written last, just before the folder is renamed into place)."""
        try:
            marker = json.loads((self._path / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(marker, dict) and marker.get("md5") == md5

    def _place_by_hand(self, md5: str) -> str:
        return (f"download it by other means and place it at '{self._archive.resolve()}' "
                f"(MD5 {md5}), then run again")

    def _hint_text(self) -> str:
        # In the message, not ProjectError.hint: Kedro's catalog re-wraps load errors in a
        # DatasetError carrying only str(error).
        return f"; {self._hint}" if self._hint else ""

    def _download(self, md5: str) -> Path:
        """The archive file, downloaded only if it is missing or its MD5 differs."""
        target = self._archive.resolve()
        if not self._url.startswith(("http://", "https://", "ftp://")):
            if target.is_file() and pooch.file_hash(str(target), alg="md5") == md5:
                return target
            raise ArchiveError(
                f"No download URL for the archive (got {self._url!r}) and no file with "
                f"MD5 {md5} at '{target}'{self._hint_text()}"
            )
        logger.info("Fetching '%s' (MD5 %s) into '%s'", self._url, md5, target)
        try:
            fetched = pooch.retrieve(
                self._url, known_hash=f"md5:{md5}", fname=target.name, path=target.parent,
                progressbar=True,
            )
        except requests.exceptions.RequestException as exc:
            reason = _short_reason(exc)
            raise ArchiveError(
                f"Cannot download '{self._url}' ({reason}); {self._place_by_hand(md5)}"
                f"{self._hint_text()}"
            ) from exc
        except ValueError as exc:
            if "does not match the known hash" not in str(exc):
                raise
            got = _GOT_HASH.search(str(exc))
            raise ArchiveError(
                f"The file downloaded from '{self._url}' has MD5 "
                f"{got.group(1) if got else '(other)'}, not the expected {md5}; it was deleted "
                f"and nothing was unpacked. Check the MD5, or {self._place_by_hand(md5)}"
                f"{self._hint_text()}"
            ) from exc
        return Path(fetched)

    def _unpack(self, archive: Path, md5: str) -> None:
        """Unpacks into a temporary sibling, checks it, then renames it to ``path`` whole."""
        parent = self._path.parent
        parent.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        staging = Path(tempfile.mkdtemp(prefix=f".{self._path.name}.unpacking-", dir=parent))
        try:
            logger.info("Unpacking '%s' into '%s'", archive, self._path)
            try:
                with zipfile.ZipFile(archive) as zipped:
                    zipped.extractall(staging)  # zipfile drops absolute and '..' parts
            except zipfile.BadZipFile as exc:
                raise ArchiveError(
                    f"'{archive}' is not a readable zip file ({exc}); delete it and run again"
                ) from exc
            if not self._root(staging).is_dir():
                found = sorted(p.name for p in staging.iterdir())[:10]
                raise ArchiveError(
                    f"'{archive}' has no folder '{self._image_root}' (it holds {found}); "
                    "check image_root in the catalog"
                )
            if self._attribution:
                (staging / "README.md").write_text(self._attribution.strip() + "\n",
                                                   encoding="utf-8")
            (staging / MARKER).write_text(json.dumps(
                {"md5": md5, "url": self._url, "archive": str(archive)}, indent=2) + "\n",
                encoding="utf-8")
            if self._path.exists():  # an older or unverified copy: replaced, never merged
                old = Path(tempfile.mkdtemp(prefix=f".{self._path.name}.old-", dir=parent))
                os.replace(self._path, old / "copy")
                shutil.rmtree(old, ignore_errors=True)
            os.replace(staging, self._path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info("Unpacked and verified: '%s'", self._root(self._path))

    def _remove_leftovers(self) -> None:
        """Temporary folders of an unpack that was killed before it could clean up."""
        for prefix in (f".{self._path.name}.unpacking-", f".{self._path.name}.old-"):
            for leftover in self._path.parent.glob(f"{prefix}*"):
                logger.info("Removing '%s', left by an interrupted unpack", leftover)
                shutil.rmtree(leftover, ignore_errors=True)


def _short_reason(exc: Exception) -> str:
    """The useful part of a requests error: the HTTP status, or the innermost cause."""
    response = getattr(exc, "response", None)
    if response is not None and getattr(response, "status_code", None):
        return f"HTTP {response.status_code} {response.reason or ''}".strip()
    text = str(exc)
    for known in ("Connection refused", "Name or service not known", "timed out",
                  "Temporary failure in name resolution", "Network is unreachable"):
        if known in text:
            return known.lower()
    return type(exc).__name__
