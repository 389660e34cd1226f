"""Hostile and broken image files for the bounded-decoding tests and the serving load test
(``benchmarks/load_serving.py``): built in memory, no real tissue in them."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def bomb_png(width: int = 100_000, height: int = 100_000, rows: int = 8) -> bytes:
    """A valid PNG header declaring ``width x height`` RGB pixels, of a few KB: its first
    ``rows`` rows of zeros compressed, the rest missing. Pillow allocates the whole image
    (``3 * width * height`` bytes: 30 GB by default) before it notices the data ends, so only a
    check on the declared size stops it."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = b"\0" * (1 + 3 * width)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(rows)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data)
            + _chunk(b"IEND", b""))


def encoded(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def bad_images(good_jpeg: bytes) -> dict[str, bytes]:
    """One of each kind of bad file a service meets: truncated JPEG, text, empty, 1x1 PNG and
    the memory bomb."""
    return {"truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
            "notes.txt": b"not an image\n",
            "empty.png": b"",
            "one_pixel.png": encoded(np.full((1, 1, 3), 200, np.uint8)),
            "bomb.png": bomb_png()}
