"""The slide reader: pyramid levels, resolution, physical tile sizes, tissue on a low level,
and one clear reason for a slide that cannot be used."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from _params import params
from _slides import BACH_DIR, bach_image, side_by_side, write_slide
from PIL import Image

from neuroblastoma_cnn.images.decoding import ImageRejected, resize_tile
from neuroblastoma_cnn.images.slides import (
    Slide,
    chosen_tiles,
    is_slide,
    iter_slide_tiles,
    open_slide,
    read_tile,
    slide_grid,
    tissue_fractions,
)

pytestmark = pytest.mark.skipif(not (BACH_DIR / "images").is_dir(), reason="no BACH images")


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """Two BACH images (256 x 192) side by side, 32 px of white around each: 640 x 256."""
    return side_by_side([bach_image("Benign"), bach_image("Invasive")], margin=32)


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory: pytest.TempPathFactory, pixels: np.ndarray) -> Path:
    return write_slide(tmp_path_factory.mktemp("slides") / "two.tif", pixels, mpp=0.5)


def tiling(**overrides: object):
    base = {"tile_size": 64, "stride": None, "input_size": 32, "min_tissue_fraction": 0.5}
    return params("ingestion", **{**base, **overrides}).tiling


def test_a_pyramidal_tiff_is_a_slide_and_a_plain_one_is_not(slide_path, tmp_path, pixels):
    crop = tmp_path / "crop.tif"
    Image.fromarray(pixels).save(crop)
    assert is_slide(slide_path) and not is_slide(crop)
    assert is_slide(tmp_path / "any.svs")  # by extension, whatever the content
    with open_slide(slide_path) as slide:
        assert slide.backend in ("tiffslide", "openslide")
        assert slide.dimensions == (640, 256)
        assert slide.level_downsamples == (1.0, 2.0, 4.0)
        assert slide.mpp == pytest.approx(0.5)
        assert np.array_equal(slide.read_region(10, 20, 0, 30, 40), pixels[20:60, 10:40])


def test_tiles_in_microns_come_from_the_coarsest_level_with_enough_pixels(slide_path, pixels):
    with open_slide(slide_path) as slide:
        grid = slide_grid(slide, tiling(tile_size=None, tile_um=32.0))  # 32 um = 64 px
        assert (grid.side0, grid.step0, grid.tile_um) == (64, 64, 32.0)
        assert (grid.read_level, grid.read_side) == (1, 32)  # 64 px / 32 input: level 1
        assert len(grid.positions) == 10 * 4
        fractions = tissue_fractions(slide, grid, tiling())
        kept, background = chosen_tiles(fractions, 0.5, None)
        tiles = list(iter_slide_tiles(slide, grid, fractions, kept, 32))
    assert not background and 0 < len(kept) < len(grid.positions)
    assert fractions[0] <= 0.25  # the corner tile: 3/4 white margin
    first = tiles[0]
    expected = resize_tile(pixels[first.y:first.y + 64, first.x:first.x + 64], 32)
    assert np.abs(first.tile.astype(int) - expected).mean() < 6  # level 1 vs level 0 resized
    same = slide_grid(open_slide(slide_path), tiling(target_mpp=0.5))  # 64 px at 0.5 um
    assert same.positions == grid.positions


def test_background_is_never_read_at_full_resolution(slide_path, monkeypatch):
    reads: list[tuple[int, int, int]] = []
    original = Slide.read_region

    def spy(self, x, y, level, width, height):
        reads.append((level, width, height))
        return original(self, x, y, level, width, height)

    monkeypatch.setattr(Slide, "read_region", spy)
    monkeypatch.setattr("neuroblastoma_cnn.images.slides.TISSUE_PIXELS_PER_TILE", 16)
    with open_slide(slide_path) as slide:
        grid = slide_grid(slide, tiling())
        fractions = tissue_fractions(slide, grid, tiling())
        assert {level for level, _, _ in reads} == {2}  # tissue: 16 px a tile, the 1/4 level
        kept, _ = chosen_tiles(fractions, 0.5, None)
        tiles = list(iter_slide_tiles(slide, grid, fractions, kept, 32))
        one_by_one = [read_tile(slide, grid, t.x, t.y, 32) for t in tiles]
    full = [r for r in reads if r[0] == 1][: -len(kept)]  # the tiles, then one by one
    assert sum(width * height for _, width, height in full) == len(kept) * 32 * 32
    assert len(full) < len(kept)  # row neighbours share a read
    assert all(np.array_equal(t.tile, o) for t, o in zip(tiles, one_by_one, strict=True))


def test_tissue_of_some_tiles_reads_them_not_the_gaps_between(slide_path, monkeypatch):
    """An annotated slide's tiles inside regions: each run of neighbours is one strip, and the
    fractions are the whole grid's."""
    reads: list[int] = []
    original = Slide.read_region

    def spy(self, x, y, level, width, height):
        reads.append(width * height)
        return original(self, x, y, level, width, height)

    monkeypatch.setattr(Slide, "read_region", spy)
    with open_slide(slide_path) as slide:
        grid = slide_grid(slide, tiling())  # 10 x 4 tiles of 64 px
        whole = tissue_fractions(slide, grid, tiling())
        read_whole, reads[:] = sum(reads), []
        some = [0, 1, 7, 8, 9, 13, 24, 25]  # runs of a row, a gap inside a row
        part = tissue_fractions(slide, replace(grid, positions=tuple(
            grid.positions[i] for i in some)), tiling())
    assert np.array_equal(part, whole[some])
    assert len(reads) == 4  # (0, 1), (7, 8, 9), (13), (24, 25): tiles 2..6 are not read
    assert sum(reads) == read_whole * len(some) // len(grid.positions)


def test_a_slide_without_resolution(tmp_path, pixels):
    path = write_slide(tmp_path / "nores.tif", pixels, mpp=None)
    with open_slide(path) as slide:
        assert slide.mpp is None
        assert len(slide_grid(slide, tiling()).positions) == 40  # pixels need no resolution
        with pytest.raises(ImageRejected, match=r"no slide resolution.*slide_fallback_mpp"):
            slide_grid(slide, tiling(tile_um=32.0))
        grid = slide_grid(slide, tiling(tile_um=32.0, slide_fallback_mpp=0.25))
    assert grid.side0 == 128 and grid.mpp == 0.25


def test_physical_sizes_are_alternatives():
    with pytest.raises(Exception, match="tile_um and target_mpp are alternatives"):
        tiling(tile_um=32.0, target_mpp=0.5)


def test_a_truncated_slide_is_one_clear_reason(slide_path, tmp_path):
    data = slide_path.read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageRejected) as caught, open_slide(cut) as slide:
        grid = slide_grid(slide, tiling())
        tissue_fractions(slide, grid, tiling())
        list(iter_slide_tiles(slide, grid, np.ones(len(grid.positions)),
                              list(range(len(grid.positions))), 32))
    message = str(caught.value)
    assert "cut.svs" in message and "\n" not in message
    assert caught.value.reason.startswith(("unreadable slide", "truncated or corrupt image"))


def test_a_slide_with_no_tissue_keeps_no_tile_but_has_fallbacks(tmp_path):
    path = write_slide(tmp_path / "white.tif", np.full((256, 256, 3), 250, np.uint8))
    with open_slide(path) as slide:
        fractions = tissue_fractions(slide, slide_grid(slide, tiling()), tiling())
    assert fractions.max() == 0.0
    assert chosen_tiles(fractions, 0.5, None) == ([], False)
    assert chosen_tiles(fractions, 0.5, 2) == ([0, 1], True)


def test_a_thumbnail_reads_a_small_level(slide_path, pixels):
    with open_slide(slide_path) as slide:
        thumb = slide.thumbnail(160)
    assert thumb.shape == (64, 160, 3)
    expected = np.asarray(Image.fromarray(pixels).reduce(4))
    assert np.abs(thumb.astype(int) - expected).mean() < 6
