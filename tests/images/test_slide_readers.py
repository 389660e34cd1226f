"""OpenSlide and tiffslide read the same slides alike: levels, resolution and pixels, for a
generic pyramidal TIFF (lossless) and an Aperio SVS laid out as a ScanScope writes it (JPEG).

Both readers decode JPEG with libjpeg-turbo here, so the tolerance is nil; a build with another
JPEG decoder may differ by a grey level or two, hence the stated tolerance of 2 grey levels a
pixel on average (and 0 for lossless tiles)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _slides import BACH_DIR, bach_image, side_by_side, write_slide, write_svs

from neuroblastoma_cnn.core.errors import ParameterError
from neuroblastoma_cnn.images.decoding import ImageRejected
from neuroblastoma_cnn.images.slides import READER_VARIABLE, open_slide

pytest.importorskip("openslide", reason="OpenSlide is in the dev extra")
pytestmark = pytest.mark.skipif(not (BACH_DIR / "images").is_dir(), reason="no BACH images")

#: Mean absolute difference (grey levels) allowed between the readers on JPEG tiles.
JPEG_TOLERANCE = 2.0


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pixels = side_by_side([bach_image("Benign"), bach_image("Invasive")], margin=32)
    root = tmp_path_factory.mktemp("readers")
    return {"generic": write_slide(root / "two.tif", pixels, mpp=0.5),
            "svs": write_svs(root / "two.svs", pixels, mpp=0.5)}


@pytest.mark.parametrize("kind", ["generic", "svs"])
def test_both_readers_see_the_same_slide(slides, kind) -> None:
    with open_slide(slides[kind], reader="openslide") as one, \
            open_slide(slides[kind], reader="tiffslide") as other:
        assert (one.backend, other.backend) == ("openslide", "tiffslide")
        assert one.level_dimensions == other.level_dimensions == ((640, 256), (320, 128),
                                                                  (160, 64))
        assert one.mpp == other.mpp == pytest.approx(0.5)
        for level, (width, height) in enumerate(one.level_dimensions):
            a = one.read_region(72, 32, level, width // 2, height // 2)  # inside the level
            b = other.read_region(72, 32, level, width // 2, height // 2)
            difference = np.abs(a.astype(int) - b).mean()
            assert difference <= (JPEG_TOLERANCE if kind == "svs" else 0.0)
        assert np.abs(one.thumbnail(100).astype(int) - other.thumbnail(100)).mean() <= 1.0


def test_the_reader_is_chosen_by_the_environment(slides, monkeypatch) -> None:
    monkeypatch.setenv(READER_VARIABLE, "tiffslide")
    assert open_slide(slides["svs"]).backend == "tiffslide"
    monkeypatch.setenv(READER_VARIABLE, "auto")
    assert open_slide(slides["svs"]).backend == "openslide"
    monkeypatch.setenv(READER_VARIABLE, "libvips")
    with pytest.raises(ParameterError, match=f"{READER_VARIABLE}='libvips'"):
        open_slide(slides["svs"])


def test_a_file_openslide_cannot_read_is_one_reason(tmp_path) -> None:
    text = tmp_path / "notes.svs"
    text.write_text("not a slide")
    with pytest.raises(ImageRejected, match="unreadable slide: OpenSlide does not know"):
        open_slide(text, reader="openslide")


def test_openslide_beyond_the_edge_is_white(slides) -> None:
    """OpenSlide gives transparent pixels outside the slide: composited on white, while an
    opaque region takes the fast path (its alpha dropped)."""
    with open_slide(slides["generic"], reader="openslide") as slide:
        region = slide.read_region(600, 40, 0, 80, 32)  # the slide is 640 px wide
        inside = slide.read_region(64, 40, 0, 80, 32)
    assert region.shape == inside.shape == (32, 80, 3) and region.flags.c_contiguous
    assert (region[:, 40:] == 255).all() and inside.flags.c_contiguous
