"""Decoding, the tissue rule and the tile grid on tiny synthetic images (imaging.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _params import params
from PIL import Image

from neuroblastoma_cnn.core.errors import DataError, ParameterError
from neuroblastoma_cnn.images import decoding as imaging
from neuroblastoma_cnn.images.decoding import (
    ImageChecks,
    ImageRejected,
    TilingConfig,
    resize_tile,
    tissue_mask,
)

PINK = (200, 110, 190)  # eosin/haematoxylin-like: saturated, not bright
WHITE = (245, 245, 245)
# the base rule (saturation 0.07, white level 220) at full resolution; reduced-scale decoding
# is tested in test_decoding.py
TILING = params("ingestion", decoding="full").tiling


def tiling(**overrides: object) -> TilingConfig:
    return TilingConfig.model_validate({**TILING.model_dump(), **overrides})


def tissue(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Pink noise: every pixel is tissue, and every image made with another seed differs."""
    rng = np.random.default_rng(seed)
    base = np.array(PINK, dtype=np.int16)
    noise = rng.integers(-15, 16, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def save(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


# ----------------------------------------------------------------------------- tissue


def test_tissue_fraction_separates_stain_from_glass_fat_and_black() -> None:
    fraction = TILING.tissue_fraction
    assert fraction(np.full((8, 8, 3), PINK, np.uint8)) == 1.0
    assert fraction(np.full((8, 8, 3), WHITE, np.uint8)) == 0.0
    assert fraction(np.full((8, 8, 3), (255, 229, 255), np.uint8)) == 0.0  # fat, tinted
    assert fraction(np.zeros((8, 8, 3), np.uint8)) == 0.0  # black border
    assert fraction(np.full((8, 8, 3), 90, np.uint8)) == 0.0  # grey debris
    half = np.full((8, 8, 3), WHITE, np.uint8)
    half[:, :4] = PINK
    assert fraction(half) == pytest.approx(0.5)


def test_tissue_thresholds_are_configurable() -> None:
    pale = np.full((4, 4, 3), (210, 190, 205), np.uint8)  # saturation ~0.095, darkest 190
    assert TILING.tissue_fraction(pale) == 1.0
    assert tiling(tissue_min_saturation=0.2).tissue_fraction(pale) == 0.0
    assert tiling(tissue_white_level=180).tissue_fraction(pale) == 0.0


def test_tissue_mask_rejects_non_rgb_uint8() -> None:
    with pytest.raises(ValueError, match="uint8"):
        tissue_mask(np.zeros((4, 4, 3), np.float32), min_saturation=0.07, white_level=220)
    with pytest.raises(ValueError, match="uint8"):
        tissue_mask(np.zeros((4, 4), np.uint8), min_saturation=0.07, white_level=220)


# ----------------------------------------------------------------------------- tiles


def test_tile_positions_grid_and_edges() -> None:
    assert tiling(tile_size=128, stride=128).positions(256, 192) == [(0, 0), (128, 0)]
    assert tiling(tile_size=128, stride=64).positions(256, 192) == [
        (0, 0), (64, 0), (128, 0), (0, 64), (64, 64), (128, 64)
    ]
    assert tiling(tile_size=128, stride=None).positions(256, 192) == [(0, 0), (128, 0)]
    assert tiling(tile_size=128, stride=128).positions(100, 300) == []
    assert tiling(tile_size=None, stride=None).positions(100, 300) == [(0, 0)]
    assert tiling(tile_size=None).footprint(100, 300) == (100, 300)
    assert tiling(tile_size=64).footprint(100, 300) == (64, 64)


def test_tiles_drop_background_and_keep_coordinates() -> None:
    rgb = np.full((64, 96, 3), WHITE, np.uint8)
    rgb[:, :32] = tissue(32, 64)  # left column of tiles is tissue
    rgb[:32, 32:64] = tissue(32, 32, seed=1)[:, :32]
    rgb[:32, 48:64] = WHITE  # tile (32, 0) is half tissue
    config = tiling(tile_size=32, stride=32, min_tissue_fraction=0.5, input_size=16)
    tiles = config.tile(rgb)
    assert [(t.x, t.y) for t in tiles] == [(0, 0), (32, 0), (0, 32)]
    assert [t.tissue_fraction for t in tiles] == pytest.approx([1.0, 0.5, 1.0])
    for tile in tiles:
        assert tile.tile.dtype == np.uint8
        assert tile.tile.shape == (16, 16, 3)
    # unpacks as (tile, x, y, tissue_fraction), the documented tuple
    pixels, x, y, fraction = tiles[1]
    np.testing.assert_array_equal(pixels, resize_tile(rgb[0:32, 32:64], 16))
    assert (x, y, fraction) == (32, 0, 0.5)
    assert len(tiling(tile_size=32, stride=32, min_tissue_fraction=0.0, input_size=16).tile(
        rgb)) == 6
    assert [(x, y) for x, y, _ in config.score(rgb)] == config.positions(96, 64)


def test_whole_image_is_one_tile_when_tile_size_is_null() -> None:
    config = tiling(tile_size=None, stride=None, min_tissue_fraction=0.25, input_size=24)
    (only,) = config.tile(tissue(40, 30))
    assert (only.x, only.y) == (0, 0)
    assert only.tile.shape == (24, 24, 3)
    assert config.tile(np.full((30, 40, 3), WHITE, np.uint8)) == []


def test_fallback_takes_the_tiles_with_most_tissue_and_flags_background() -> None:
    rgb = np.full((64, 96, 3), WHITE, np.uint8)
    rgb[:16, :16] = PINK  # tile (0, 0): 25% tissue
    rgb[32:, 64:] = PINK  # tile (64, 32): 100%, above the threshold
    config = tiling(tile_size=32, stride=32, min_tissue_fraction=0.5, input_size=16)
    tiles, background = config.tiles_or_fallback(rgb, 2)
    assert not background and [(t.x, t.y) for t in tiles] == [(64, 32)]
    rgb[32:, 64:] = WHITE
    tiles, background = config.tiles_or_fallback(rgb, 2)
    assert background
    assert [(t.x, t.y) for t in tiles] == [(0, 0), (32, 0)]  # best two, in grid order
    assert tiles[0].tissue_fraction == pytest.approx(0.25)


def test_resize_uses_pillow_bilinear_exactly() -> None:
    rgb = tissue(48, 48, seed=3)
    expected = np.asarray(Image.fromarray(rgb).resize((20, 20), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(resize_tile(rgb, 20), expected)
    assert imaging.RESIZE_FILTER == Image.Resampling.BILINEAR
    # a tile already at input size is passed through untouched
    np.testing.assert_array_equal(resize_tile(rgb, 48), rgb)


def test_tiling_config_validates_each_value() -> None:
    for key, value in [("tile_size", 0), ("stride", -2), ("input_size", 2.5),
                       ("min_tissue_fraction", 1.5), ("tissue_white_level", 300),
                       ("tile_size", True)]:
        with pytest.raises(ParameterError, match=rf"ingestion\.{key} = "):
            params("ingestion", **{key: value})


# ----------------------------------------------------------------------------- decoding


def test_read_round_trips_png_and_names_bad_files(tmp_path: Path) -> None:
    checks = ImageChecks(extensions=[".png", ".jpg"], max_image_pixels=10_000, min_image_size=4)
    rgb = tissue(20, 10)
    path = save(tmp_path / "a.png", rgb)
    np.testing.assert_array_equal(checks.read(path, "a.png", None), rgb)
    (tmp_path / "b.jpg").write_text("not an image")
    with pytest.raises(ImageRejected, match=r"b\.jpg.*not a readable image") as info:
        checks.read(tmp_path / "b.jpg", "b.jpg", None)
    assert info.value.reason.startswith("not a readable image")
    assert isinstance(info.value, DataError)  # a project error: reported in one line
    with pytest.raises(ImageRejected, match="cannot read"):
        checks.read(tmp_path / "missing.png", "missing.png", None)
    with pytest.raises(ImageRejected, match=r"not an image extension: '\.txt'"):
        checks.read(tmp_path / "a.txt", "a.txt", None)
    small = checks.model_copy(update={"max_image_pixels": 100})
    with pytest.raises(ImageRejected, match="decompression bomb"):
        small.read(path, "a.png", None)
    with pytest.raises(ImageRejected, match="too small for one tile: image is 20x10, tile_size"):
        checks.read(path, "a.png", 16)
    with pytest.raises(ImageRejected, match="too small: image is 20x10, min_image_size is 12"):
        checks.model_copy(update={"min_image_size": 12}).read(path, "a.png", None)
