"""Ingestion on a raw folder holding every kind of bad input, and on every colour mode.

Each bad case must end up in the rejected list with its own reason, good images must survive,
every colour mode must become the right 8-bit RGB, and the raw folder must not change.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _params import params
from PIL import Image

from neuroblastoma_cnn.datasets import TileStore, write_tile_store
from neuroblastoma_cnn.images.decoding import decode_image
from neuroblastoma_cnn.pipelines.ingestion.nodes import (
    NoUsableImagesError,
    build_image_manifest,
    tile_images,
)

SETTINGS = {
    "extensions": [".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp"],
    "group_pattern": None,
    "max_image_pixels": 50_000,  # low, so that a 300x300 image counts as a bomb
    "min_image_size": 16,
    "tile_size": 64,
    "stride": 64,
    "min_tissue_fraction": 0.5,
    "input_size": 16,
}
PARAMS = params("ingestion", **SETTINGS)


def load_rgb(path: Path) -> np.ndarray:
    """One file decoded as ingestion decodes it."""
    return decode_image(path.read_bytes(), str(path), 250_000_000)[0]


def tissue(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.integers(-20, 21, size=(height, width, 3))
    return np.clip(np.array([200, 110, 190]) + noise, 0, 255).astype(np.uint8)


def save(path: Path, image: np.ndarray | Image.Image, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image.save(path, **kwargs)
    return path


def write_png16(path: Path, values: np.ndarray) -> Path:
    """Writes a 16-bit PNG by hand: Pillow cannot save 16-bit RGB(A) itself."""
    height, width, channels = values.shape
    colour_type = {1: 0, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    return path


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def tree_fingerprint(root: Path) -> list[tuple[str, bool, int, str]]:
    """Every entry (hidden and empty ones too) with its content hash and modification time."""
    entries = []
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            stat = path.stat()
            digest = "" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
            entries.append((str(path.relative_to(root)), path.is_dir(), stat.st_mtime_ns, digest))
    return sorted(entries)


@pytest.fixture(scope="module")
def bad_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad") / "images"
    good = root / "Good"
    save(good / "good1.png", tissue(128, 64, 1))
    save(good / "good2.jpg", tissue(128, 64, 2), quality=95)
    save(good / "good3.tif", tissue(128, 128, 3))
    save(good / "blank.png", np.full((64, 64, 3), 245, np.uint8))
    (good / "zero.png").write_bytes(b"")
    truncate(save(good / "trunc.jpg", tissue(200, 200, 4), quality=95))
    truncate(save(good / "trunc.png", tissue(200, 200, 5)))
    (good / "text.jpg").write_text("this is a text file, not a JPEG")
    save(good / "gif_inside.png", Image.fromarray(tissue(64, 64, 6)).convert("P"), format="GIF")
    save(good / "bomb.png", tissue(300, 300, 7))
    save(good / "small.png", tissue(40, 40, 8))
    (good / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (good / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    save(good / ".hidden.png", tissue(64, 64, 9))
    save(good / "._good1.png", tissue(64, 64, 10))
    save(good / ".ipynb_checkpoints" / "copy.png", tissue(64, 64, 11))
    (good / "notes.txt").write_text("scanner settings")
    save(good / "anim.gif", tissue(64, 64, 12))
    save(good / "dup_a.png", tissue(64, 64, 13))
    (good / "dup_b.png").write_bytes((good / "dup_a.png").read_bytes())
    save(good / "deep" / "sub" / "x.png", tissue(64, 64, 14))
    (good / "P9").mkdir()
    save(root / "Other" / "other1.png", tissue(64, 64, 15))
    save(root / "Other" / "conflict_a.png", tissue(64, 64, 16))
    save(root / "Third" / "third1.png", tissue(64, 64, 17))
    (root / "Third" / "conflict_b.png").write_bytes((root / "Other/conflict_a.png").read_bytes())
    (root / "Empty").mkdir()
    (root / "NotesOnly").mkdir()
    (root / "NotesOnly" / "readme.txt").write_text("todo")
    save(root / "CaseTest" / "UPPER.PNG", tissue(64, 64, 18))
    (root / ".DS_Store").write_bytes(b"\x00")
    save(root / "stray.png", tissue(64, 64, 19))
    return root


@pytest.fixture(scope="module")
def ingested(bad_raw: Path) -> tuple[pd.DataFrame, pd.DataFrame, list]:
    before = tree_fingerprint(bad_raw)
    manifest, rejected = build_image_manifest(bad_raw, PARAMS)
    stream = tile_images(bad_raw, manifest, PARAMS)
    write_tile_store(bad_raw.parent / "tiles", stream, stream.metadata)
    return manifest, rejected, before


def test_every_bad_input_has_its_reason(ingested: tuple) -> None:
    _, rejected, _ = ingested
    assert list(rejected.columns) == ["file", "reason"]
    reasons = dict(zip(rejected["file"], rejected["reason"], strict=True))
    assert len(reasons) == len(rejected), "a file is listed twice"
    expected_prefix = {
        "Good/zero.png": "empty file: 0 bytes",
        "Good/trunc.jpg": "truncated or corrupt image: image file is truncated",
        "Good/trunc.png": "truncated or corrupt image",
        "Good/text.jpg": "not a readable image: content is not a TIFF, PNG, JPEG or BMP",
        "Good/gif_inside.png": "not a readable image",
        "Good/bomb.png": "decompression bomb: 300x300 = 90000 pixels is more than "
                         "ingestion.max_image_pixels = 50000 (refused before decoding",
        "Good/small.png": "too small for one tile: image is 40x40, tile_size is 64",
        "Good/.DS_Store": "hidden or system file",
        "Good/Thumbs.db": "hidden or system file",
        "Good/.hidden.png": "hidden or system file",
        "Good/._good1.png": "hidden or system file",
        "Good/.ipynb_checkpoints/": "hidden or system file",
        ".DS_Store": "hidden or system file",
        "Good/notes.txt": "not an image extension: '.txt'",
        "Good/anim.gif": "not an image extension: '.gif'",
        "NotesOnly/readme.txt": "not an image extension: '.txt'",
        "Good/dup_b.png": "duplicate: identical bytes to 'Good/dup_a.png'",
        "Other/conflict_a.png": "label conflict: identical bytes under classes Other, Third",
        "Third/conflict_b.png": "label conflict: identical bytes under classes Other, Third",
        "Empty/": "empty class folder: no image files",
        "NotesOnly/": "empty class folder: no image files",
        "Good/deep/sub/": "folder nested too deep",
        "Good/deep/": "empty patient folder",
        "Good/P9/": "empty patient folder",
        "stray.png": "not inside a class folder",
        "Good/blank.png": "mostly background: no tile with tissue fraction >= 0.5",
    }
    for file, prefix in expected_prefix.items():
        assert file in reasons, f"{file} missing from the rejected list"
        assert reasons[file].startswith(prefix), f"{file}: {reasons[file]!r}"
    assert set(reasons) == set(expected_prefix)
    assert "Other/conflict_a.png" in reasons["Third/conflict_b.png"]  # names the other copy


def test_good_images_survive_with_their_properties(ingested: tuple) -> None:
    manifest, _, _ = ingested
    rows = manifest.set_index("image_path")
    assert sorted(rows.index) == [
        "CaseTest/UPPER.PNG", "Good/blank.png", "Good/dup_a.png", "Good/good1.png",
        "Good/good2.jpg", "Good/good3.tif", "Other/other1.png", "Third/third1.png",
    ]
    assert rows.loc["Good/good3.tif", "n_tiles"] == 4
    assert rows.loc["Good/good1.png", "n_tiles"] == 2
    assert rows.loc["Good/blank.png", "n_tiles"] == 0  # listed, and reported as background
    assert (rows.loc["Good/good2.jpg", "width"], rows.loc["Good/good2.jpg", "height"]) == (128, 64)


def test_tile_store_holds_only_good_images(bad_raw: Path, ingested: tuple) -> None:
    store = TileStore(bad_raw.parent / "tiles")
    assert set(store.index["image_path"]) == {
        "CaseTest/UPPER.PNG", "Good/dup_a.png", "Good/good1.png", "Good/good2.jpg",
        "Good/good3.tif", "Other/other1.png", "Third/third1.png",
    }
    assert store.metadata["classes"] == ["CaseTest", "Good", "Other", "Third"]


def test_raw_folder_is_unchanged(bad_raw: Path, ingested: tuple) -> None:
    _, _, before = ingested
    after = tree_fingerprint(bad_raw)
    assert after == before
    assert any(name == "Empty" for name, *_ in after)  # empty folders are part of the check


# ----------------------------------------------------------------------------- nothing usable


def test_nothing_usable_names_the_folder_and_the_expected_layout(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    (root / "A").mkdir(parents=True)
    (root / "A" / "zero.png").write_bytes(b"")
    (root / "A" / "notes.txt").write_text("x")
    with pytest.raises(NoUsableImagesError) as info:
        build_image_manifest(root, PARAMS)
    message = str(info.value)
    assert f"No usable images in raw folder '{root}'" in message
    assert "<CLASS>/<file> or <CLASS>/<PATIENT>/<file>" in message
    assert "A/zero.png: empty file" in message


def test_missing_empty_or_file_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NoUsableImagesError, match=r"'.*nope' does not exist\. Expected images"):
        build_image_manifest(tmp_path / "nope", PARAMS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoUsableImagesError, match=r"empty'.*The folder is empty"):
        build_image_manifest(tmp_path / "empty", PARAMS)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NoUsableImagesError, match="is not a folder"):
        build_image_manifest(tmp_path / "file", PARAMS)


# ----------------------------------------------------------------------------- colour modes


def uniform(mode: str, value: object, size: tuple[int, int] = (8, 6)) -> Image.Image:
    return Image.new(mode, size, value)  # type: ignore[arg-type]


def assert_rgb(path: Path, expected: tuple[int, int, int], tolerance: int = 0) -> None:
    rgb = load_rgb(path)
    assert rgb.dtype == np.uint8
    assert rgb.ndim == 3
    assert rgb.shape[2] == 3
    diff = np.abs(rgb.astype(int) - np.array(expected)).max()
    assert diff <= tolerance, f"{path.name}: got {rgb[0, 0].tolist()}, expected {expected}"


def test_grayscale_binary_and_palette_become_rgb(tmp_path: Path) -> None:
    assert_rgb(save(tmp_path / "gray.png", uniform("L", 100)), (100, 100, 100))
    assert_rgb(save(tmp_path / "gray.jpg", uniform("L", 100)), (100, 100, 100), tolerance=1)
    assert_rgb(save(tmp_path / "one.bmp", uniform("1", 1)), (255, 255, 255))
    palette = uniform("P", 2)
    palette.putpalette([0, 0, 0, 10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 9))
    assert_rgb(save(tmp_path / "palette.png", palette), (200, 100, 50))
    assert_rgb(save(tmp_path / "palette.bmp", palette), (200, 100, 50))
    assert_rgb(save(tmp_path / "palette_transparent.png", palette, transparency=2),
               (255, 255, 255))


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    half = 200 * 128 / 255 + 255 * 127 / 255, 255 * 127 / 255, 255 * 127 / 255
    expected = tuple(round(v) for v in half)
    assert_rgb(save(tmp_path / "rgba.png", uniform("RGBA", (200, 0, 0, 128))), expected,
               tolerance=1)
    assert_rgb(save(tmp_path / "rgba_clear.png", uniform("RGBA", (0, 0, 0, 0))), (255, 255, 255))
    assert_rgb(save(tmp_path / "rgba_opaque.tif", uniform("RGBA", (10, 20, 30, 255))),
               (10, 20, 30))
    assert_rgb(save(tmp_path / "la.png", uniform("LA", (0, 0))), (255, 255, 255))


def test_cmyk_becomes_rgb(tmp_path: Path) -> None:
    assert_rgb(save(tmp_path / "cyan.tif", uniform("CMYK", (255, 0, 0, 0))), (0, 255, 255))
    assert_rgb(save(tmp_path / "magenta.tif", uniform("CMYK", (0, 255, 0, 0))), (255, 0, 255))
    assert_rgb(save(tmp_path / "black.tif", uniform("CMYK", (0, 0, 0, 255))), (0, 0, 0))
    assert_rgb(save(tmp_path / "cyan.jpg", uniform("CMYK", (255, 0, 0, 0)), quality=95),
               (0, 255, 255), tolerance=4)


def test_16_bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 128 * 257, 65535]], dtype=np.uint16)
    for name in ("gray16.png", "gray16.tif"):
        path = save(tmp_path / name, Image.fromarray(values))
        assert Image.open(path).mode.startswith("I;16")  # really a 16-bit file
        np.testing.assert_array_equal(load_rgb(path)[0], [[0, 0, 0], [128] * 3, [255] * 3])
    rgb16 = np.zeros((2, 3, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 1] = 65535, 128 * 257
    assert_rgb(write_png16(tmp_path / "rgb16.png", rgb16), (255, 128, 0))
    rgba16 = np.zeros((2, 3, 4), np.uint16)  # fully transparent black -> white
    assert_rgb(write_png16(tmp_path / "rgba16.png", rgba16), (255, 255, 255))


@pytest.mark.parametrize(("orientation", "turns"), [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_honoured(tmp_path: Path, orientation: int, turns: int) -> None:
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :32] = (220, 30, 30)
    stored[:, 32:] = (30, 30, 220)
    stored[:8, :8] = (30, 220, 30)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(tmp_path / f"rot{orientation}.jpg", stored, exif=exif, quality=95)
    with Image.open(path) as image:
        decoded = np.asarray(image.convert("RGB"))  # the stored pixels, not turned
    rgb = load_rgb(path)
    np.testing.assert_array_equal(rgb, np.rot90(decoded, k=turns))
    assert rgb.shape == ((64, 32, 3) if orientation in (6, 8) else (32, 64, 3))


def test_manifest_records_source_mode_and_oriented_size(tmp_path: Path) -> None:
    root = tmp_path / "raw" / "A"
    save(root / "gray.png", Image.fromarray(tissue(80, 70, 1)).convert("L"))
    save(root / "cmyk.tif", Image.fromarray(tissue(80, 70, 2)).convert("CMYK"))
    save(root / "gray16.tif", Image.fromarray(tissue(80, 70, 3)[..., 0].astype(np.uint16) * 257))
    exif = Image.Exif()
    exif[0x0112] = 6
    save(root / "turned.jpg", tissue(80, 70, 4), exif=exif)
    manifest, _ = build_image_manifest(tmp_path / "raw", params("ingestion", **{**SETTINGS,
                                                                   "tile_size": None}))
    rows = manifest.set_index("image_path")
    assert rows.loc["A/gray.png", "mode"] == "L"
    assert rows.loc["A/cmyk.tif", "mode"] == "CMYK"
    assert rows.loc["A/gray16.tif", "mode"].startswith("I;16")
    assert (rows.loc["A/turned.jpg", "width"], rows.loc["A/turned.jpg", "height"]) == (70, 80)
