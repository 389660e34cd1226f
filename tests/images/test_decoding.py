"""Reduced-scale decoding (``decoding: reduced``): the reduction factor, JPEG draft decoding,
box reduction for other formats, closeness to the full method, and old records.

Tolerance of "close": on a smooth H&E-coloured JPEG, reduced tiles differ from the full method's
(native decode + bilinear resize) by at most 3 grey levels on average and a PSNR of at least
30 dB; their tissue fractions by at most 0.05. (On 300 BACH images, benchmarks/bench_decoding.py
measures the same numbers on real tissue.)
"""

from __future__ import annotations

import io
import pickle
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from _params import params
from PIL import Image, JpegImagePlugin

from neuroblastoma_cnn.core.errors import ParameterError
from neuroblastoma_cnn.images.decoding import (
    Decoded,
    ImageChecks,
    ImageRejected,
    TilingConfig,
    decode_image,
    decode_scaled,
    reduce_rgb,
)
from neuroblastoma_cnn.images.preprocessing import Preprocessing

CHECKS = ImageChecks(extensions=[".png", ".jpg"], max_image_pixels=10_000_000, min_image_size=16)
BASE = params("ingestion").tiling


def tiling(**overrides: object) -> TilingConfig:
    return TilingConfig.model_validate({**BASE.model_dump(), **overrides})


def smooth_tissue(width: int, height: int, seed: int = 0) -> np.ndarray:
    """H&E-like colours varying smoothly (upsampled noise), with a white glass corner."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    noise = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    pink = np.array([200, 110, 190], np.float32)
    rgb = pink + (noise.astype(np.float32) - 128) * 0.25
    rgb[: height // 3, : width * 3 // 8] = 245  # glass
    return np.clip(rgb, 0, 255).astype(np.uint8)


def encode(rgb: np.ndarray, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- the factor


def test_reduction_is_the_largest_power_of_two_keeping_tiles_at_input_size() -> None:
    reduced = tiling(decoding="reduced", tile_size=512, stride=512)
    assert reduced.model_copy(update={"input_size": 128}).reduction(2048, 1536) == 4
    assert reduced.model_copy(update={"input_size": 224}).reduction(2048, 1536) == 2
    assert reduced.model_copy(update={"input_size": 512}).reduction(2048, 1536) == 1
    assert reduced.model_copy(update={"input_size": 16}).reduction(2048, 1536) == 32
    # tile size and stride must fall on whole reduced pixels
    assert tiling(decoding="reduced", tile_size=300, stride=300, input_size=64).reduction(
        900, 900) == 4
    assert tiling(decoding="reduced", tile_size=512, stride=100, input_size=64).reduction(
        900, 900) == 4
    assert tiling(decoding="reduced", tile_size=512, stride=50, input_size=64).reduction(
        900, 900) == 2
    assert tiling(decoding="reduced", tile_size=333, stride=None, input_size=64).reduction(
        999, 999) == 1
    # whole image as one tile: both sides stay >= input_size
    whole = tiling(decoding="reduced", tile_size=None, stride=None, input_size=224)
    assert whole.reduction(1000, 700) == 2
    assert whole.reduction(1000, 447) == 1
    # the full method never reduces
    assert tiling(decoding="full", tile_size=512, input_size=16).reduction(2048, 1536) == 1


# ----------------------------------------------------------------------------- decoding


def test_jpeg_is_decoded_at_reduced_scale_by_the_jpeg_decoder(monkeypatch) -> None:
    rgb = smooth_tissue(260, 130)  # not a multiple of 4: the last reduced pixel is partial
    data = encode(rgb, "JPEG", quality=90)
    calls = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):  # type: ignore[no-untyped-def]
        calls.append(size)
        return original(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    decoded = decode_scaled(data, "a.jpg", 10**7, lambda w, h: 4)
    assert calls == [(65, 32)]
    assert decoded.rgb.shape == (33, 65, 3)  # ceil(130 / 4), ceil(260 / 4)
    assert (decoded.scale, decoded.width, decoded.height, decoded.mode) == (4, 260, 130, "RGB")
    # beyond 1/8 the JPEG decoder stops; a box reduction does the rest
    eighth = decode_scaled(data, "a.jpg", 10**7, lambda w, h: 8).rgb
    sixteenth = decode_scaled(data, "a.jpg", 10**7, lambda w, h: 16)
    np.testing.assert_array_equal(sixteenth.rgb, reduce_rgb(eighth, 2))
    # decoding is deterministic: the same bytes give the same pixels
    np.testing.assert_array_equal(decode_scaled(data, "a.jpg", 10**7, lambda w, h: 4).rgb,
                                  decoded.rgb)
    # reduction 1 is exactly the native decode of before
    np.testing.assert_array_equal(decode_scaled(data, "a.jpg", 10**7, lambda w, h: 1).rgb,
                                  np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_png_is_box_reduced_like_the_same_pixels_in_memory() -> None:
    rgb = smooth_tissue(130, 98)
    decoded = decode_scaled(encode(rgb, "PNG"), "a.png", 10**7, lambda w, h: 2)
    np.testing.assert_array_equal(decoded.rgb, reduce_rgb(rgb, 2))
    assert decoded.rgb.shape == (49, 65, 3)
    config = tiling(decoding="reduced", tile_size=32, stride=32, input_size=16,
                    min_tissue_fraction=0.5)
    from_file = config.tile(CHECKS.decode_for(encode(rgb, "PNG"), "a.png", config))
    from_memory = config.tile(rgb)  # a native array is box-reduced the same way
    assert [(t.x, t.y, t.tissue_fraction) for t in from_file] == [
        (t.x, t.y, t.tissue_fraction) for t in from_memory]
    for a, b in zip(from_file, from_memory, strict=True):
        np.testing.assert_array_equal(a.tile, b.tile)


def test_reduced_tiles_are_close_to_full_tiles_at_the_same_positions() -> None:
    rgb = smooth_tissue(512, 384, seed=3)
    data = encode(rgb, "JPEG", quality=90)
    full = tiling(decoding="full", tile_size=128, stride=64, input_size=32,
                  min_tissue_fraction=0.25)
    reduced = full.model_copy(update={"decoding": "reduced"})
    assert reduced.reduction(512, 384) == 4
    full_decoded = CHECKS.decode_for(data, "a.jpg", full)
    red_decoded = CHECKS.decode_for(data, "a.jpg", reduced)
    assert full_decoded.rgb.shape == (384, 512, 3) and red_decoded.rgb.shape == (96, 128, 3)
    full_scores, red_scores = full.score(full_decoded), reduced.score(red_decoded)
    assert [s[:2] for s in full_scores] == [s[:2] for s in red_scores]  # native positions
    errors = [abs(a[2] - b[2]) for a, b in zip(full_scores, red_scores, strict=True)]
    assert max(errors) <= 0.05
    full_tiles = {(t.x, t.y): t.tile for t in full.tile(full_decoded)}
    red_tiles = {(t.x, t.y): t.tile for t in reduced.tile(red_decoded)}
    assert set(full_tiles) == set(red_tiles)
    assert (0, 0) not in red_tiles and (64, 0) not in red_tiles  # glass in both
    assert (128, 0) in red_tiles  # half glass
    delta = np.stack([np.abs(full_tiles[k].astype(np.int16) - red_tiles[k])
                      for k in sorted(full_tiles)])
    assert all(t.shape == (32, 32, 3) and t.dtype == np.uint8 for t in red_tiles.values())
    assert delta.mean() <= 3.0
    psnr = 10 * np.log10(255**2 / np.mean(delta.astype(np.float64) ** 2))
    assert psnr >= 30.0
    # the full method is unchanged: the tiles of the native decode, as before
    native = decode_image(data, "a.jpg", 10**7)[0]
    for tile in full.tile(native):
        np.testing.assert_array_equal(tile.tile, full_tiles[(tile.x, tile.y)])


def test_size_checks_and_orientation_use_the_native_size() -> None:
    reduced = tiling(decoding="reduced", tile_size=64, stride=64, input_size=16)
    small = encode(smooth_tissue(60, 200), "JPEG")
    with pytest.raises(ImageRejected, match="too small for one tile: image is 60x200"):
        CHECKS.decode_for(small, "small.jpg", reduced)
    bomb = CHECKS.model_copy(update={"max_image_pixels": 1000})
    with pytest.raises(ImageRejected, match="decompression bomb: 60x200"):
        bomb.decode_for(small, "small.jpg", reduced)
    # EXIF orientation 6 (a quarter turn): 128x64 stored, 64x128 shown
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = encode(smooth_tissue(128, 64), "JPEG", exif=exif)
    decoded = CHECKS.decode_for(turned, "turned.jpg", reduced)
    assert (decoded.width, decoded.height, decoded.scale) == (64, 128, 4)
    assert decoded.rgb.shape == (32, 16, 3)
    assert reduced.positions(decoded.width, decoded.height) == [(0, 0), (0, 64)]
    assert len(reduced.score(decoded)) == 2


def test_a_decoded_image_is_only_ever_reduced_further() -> None:
    reduced = tiling(decoding="reduced", tile_size=64, stride=64, input_size=16)
    rgb = smooth_tissue(128, 128)
    half = Decoded(reduce_rgb(rgb, 2), 2, 128, 128, "RGB")
    np.testing.assert_array_equal(reduced.at_scale(half).rgb, reduce_rgb(half.rgb, 2))
    with pytest.raises(ValueError, match="cannot be tiled at 1/1"):
        tiling(decoding="full").at_scale(half)


def test_rejections_survive_a_worker_process() -> None:
    error = pickle.loads(pickle.dumps(ImageRejected("a/b.png", "too small: 3x3")))
    assert (error.path, error.reason, str(error)) == ("a/b.png", "too small: 3x3",
                                                      "'a/b.png': too small: 3x3")


# ----------------------------------------------------------------------------- records


def test_records_without_decoding_mean_full_and_new_records_keep_theirs() -> None:
    record = Preprocessing(classes=["a", "b"], image_checks=CHECKS,
                           tiling=tiling(decoding="reduced"), architecture="resnet34")
    written = record.to_dict()
    assert written["tiling"]["decoding"] == "reduced"
    assert Preprocessing.from_dict(written).tiling.decoding == "reduced"
    del written["tiling"]["decoding"]  # a model saved before the field existed
    assert Preprocessing.from_dict(written).tiling.decoding == "full"
    legacy = {"classes": ["a", "b"], "input_size": 64, "tile_size": 128, "stride": 128,
              "min_tissue_fraction": 0.25,
              "ingestion": {"tile_size": 128, "stride": 128, "input_size": 64}}
    assert Preprocessing.from_dict(legacy).tiling.decoding == "full"


def test_decoding_is_a_required_validated_ingestion_parameter() -> None:
    assert params("ingestion", decoding="reduced").tiling.decoding == "reduced"
    with pytest.raises(ParameterError, match=r"ingestion\.decoding = 'half'"):
        params("ingestion", decoding="half")
    with pytest.raises(ParameterError, match=r"ingestion\.workers = -1"):
        params("ingestion", workers=-1)


def test_reduced_reading_a_file_and_its_bytes_agree(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(encode(smooth_tissue(256, 256), "JPEG"))
    reduced = tiling(decoding="reduced", tile_size=128, stride=128, input_size=32)
    from_path = CHECKS.read_for(path, "a.jpg", reduced)
    from_bytes = CHECKS.decode_for(path.read_bytes(), "a.jpg", reduced)
    np.testing.assert_array_equal(from_path.rgb, from_bytes.rgb)
    assert from_path.scale == 4


def test_decoding_on_threads_leaves_warnings_and_pillow_limit_as_they_were() -> None:
    """Prediction decodes on threads: Pillow's pixel limit and the warning filters are
    process-wide, and must be as before once every decode has ended."""
    filters, limit = list(warnings.filters), Image.MAX_IMAGE_PIXELS
    data = encode(smooth_tissue(256, 256), "JPEG")
    with ThreadPoolExecutor(4) as pool:
        decoded = list(pool.map(lambda _: decode_scaled(data, "a.jpg", 10**7, lambda w, h: 2),
                                range(60)))
    assert all(np.array_equal(d.rgb, decoded[0].rgb) for d in decoded)
    assert warnings.filters == filters
    assert limit == Image.MAX_IMAGE_PIXELS
