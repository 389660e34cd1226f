"""A Kather-2016-shaped archive made from real BACH tissue, and a loopback server for it.

The demo downloads Kather et al. 2016 (8 classes of 150x150 px TIFF tiles named after their
source slide). Tests must not reach the internet, so they build an archive with the same layout
from a few BACH images (re-tiled to 150 px, named in the Kather pattern, every slide holding
several classes) and serve it from ``http.server`` on 127.0.0.1. Everything is written to
temporary folders: nothing derived from BACH may be committed (its licence).
"""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from PIL import Image

TOP = "Kather_texture_2016_image_tiles_5000"
ARCHIVE_NAME = f"{TOP}.zip"
TILE = 150
#: The demo's slide pattern (conf/demo/parameters.yml: ingestion.group_pattern).
SLIDE = "CRC-Prim-HE-{:02d}"


def tile_name(slide: int, image: int, row: int, col: int) -> str:
    """Kather's naming: ``<id>_CRC-Prim-HE-<NN>_<n>.tif_Row_<r>_Col_<c>.tif``."""
    return (f"{image:04X}_{SLIDE.format(slide)}_{image % 1000:03d}.tif"
            f"_Row_{row * TILE + 1}_Col_{col * TILE + 1}.tif")


def make_kather_like(
    dest: Path,
    bach: Path,
    *,
    images_per_class: int,
    n_slides: int,
    tiles_per_image: int,
    downscale: int = 4,
    classes: tuple[str, ...] = ("Benign", "InSitu", "Invasive", "Normal"),
    folder_names: tuple[str, ...] | None = None,
) -> Path:
    """Writes ``dest/<TOP>/<NN_CLASS>/<tile>.tif``; returns ``dest``.

    Class folders are ``01_BENIGN``... after the BACH classes, or ``folder_names`` (e.g.
    Kather's own ``01_TUMOR``... where a test needs the demo catalog's folder names; the tissue
    is then BACH's, not what the name says). Source image ``i`` of every class goes to slide
    ``i % n_slides + 1``, so each slide holds tiles of every class (as Kather's slides do).
    """
    names = folder_names or tuple(f"{n:02d}_{c.upper()}" for n, c in enumerate(classes, 1))
    for number, (name, folder_name) in enumerate(zip(classes, names, strict=True), start=1):
        folder = dest / TOP / folder_name
        folder.mkdir(parents=True, exist_ok=True)
        sources = sorted((bach / "images" / name).glob("*.jpg"))[:images_per_class]
        if len(sources) < images_per_class:
            raise ValueError(f"BACH class {name} has only {len(sources)} images")
        for i, src in enumerate(sources):
            slide = i % n_slides + 1
            with Image.open(src) as im:
                size = (im.width // downscale, im.height // downscale)
                im.draft("RGB", size)
                rgb = im.convert("RGB").resize(size, Image.Resampling.LANCZOS)
            cols, rows = rgb.width // TILE, rgb.height // TILE
            cells = [(r, c) for r in range(rows) for c in range(cols)][:tiles_per_image]
            for row, col in cells:
                box = (col * TILE, row * TILE, (col + 1) * TILE, (row + 1) * TILE)
                image_id = number * 1000 + i
                rgb.crop(box).save(folder / tile_name(slide, image_id, row, col),
                                   format="TIFF")
    return dest


def zip_folder(folder: Path, archive: Path) -> str:
    """Zips ``folder``'s content (paths relative to it); returns the zip's MD5."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in sorted(folder.rglob("*")):
            zipped.write(path, path.relative_to(folder).as_posix())
    return hashlib.md5(archive.read_bytes()).hexdigest()


@dataclass
class ServedFolder:
    """A folder served on loopback; ``requests`` lists every path asked for."""

    url: str
    requests: list[str] = field(default_factory=list)


@contextmanager
def serve(folder: Path) -> Iterator[ServedFolder]:
    """Serves ``folder`` over HTTP on 127.0.0.1 (ephemeral port) from a thread, then stops."""
    served = ServedFolder(url="")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            served.requests.append(self.path)

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(Handler, directory=str(folder))
    )
    served.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def refused_url(name: str = ARCHIVE_NAME) -> str:
    """A loopback URL on a port nobody listens on: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"
