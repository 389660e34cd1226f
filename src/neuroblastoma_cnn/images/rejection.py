"""Why a file is not used: the stable reasons of the rejected list, the error that carries one,
and the hidden or system files that are skipped before any decoding.

Re-exported by :mod:`neuroblastoma_cnn.images.decoding` (import them from there or here).
"""

from __future__ import annotations

import os

from neuroblastoma_cnn.core.errors import DataError

SYSTEM_FILES = frozenset(
    name.lower()
    for name in (
        "Thumbs.db", "ehthumbs.db", "desktop.ini", "Icon\r", "__MACOSX",
        "$RECYCLE.BIN", "System Volume Information", "lost+found",
    )
)


class Reason:
    """Stable prefixes of the reasons written to the rejected list (``"<prefix>: details"``)."""

    HIDDEN = "hidden or system file"
    OUTSIDE_CLASS = "not inside a class folder"
    TOO_DEEP = "folder nested too deep"
    EMPTY_CLASS = "empty class folder"
    EMPTY_PATIENT = "empty patient folder"
    NOT_IMAGE_EXTENSION = "not an image extension"
    NO_GROUP = "group_pattern does not match"
    EMPTY_FILE = "empty file"
    NOT_AN_IMAGE = "not a readable image"
    CORRUPT = "truncated or corrupt image"
    BOMB = "decompression bomb"
    UNSUPPORTED_MODE = "unsupported colour mode"
    TOO_SMALL = "too small"
    LABEL_CONFLICT = "label conflict"
    DUPLICATE = "duplicate"
    BACKGROUND = "mostly background"
    SLIDE_UNREADABLE = "unreadable slide"
    NO_RESOLUTION = "no slide resolution"
    NO_ANNOTATIONS = "slide without annotations"
    SEVERAL_ANNOTATIONS = "several annotation files"
    ORPHAN_ANNOTATIONS = "annotations without a slide"
    ANNOTATIONS_UNREADABLE = "unreadable annotations"
    REGION_REFUSED = "region refused"
    NO_REGION = "no usable region"


class ImageRejected(DataError):
    """A file that cannot be used as an image; ``reason`` is what the rejected list shows."""

    def __init__(self, path: str | os.PathLike[str], reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"'{self.path}': {reason}")

    def __reduce__(self) -> tuple[type[ImageRejected], tuple[str, str]]:
        # Raised in worker processes too: pickled with both arguments, not the message alone.
        return type(self), (self.path, self.reason)


def is_hidden(name: str) -> bool:
    """Dotfiles (``.DS_Store``, ``._x.jpg``) and operating-system clutter such as Thumbs.db."""
    return name.startswith((".", "~$")) or name.lower() in SYSTEM_FILES
