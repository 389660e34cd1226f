"""Unit tests of the ingestion functions on tiny synthetic images (no Kedro, no BACH)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from kedro.io.core import DatasetError, Version
from PIL import Image

from neuroblastoma_cnn.datasets import ImageFolderDataset, TileStoreDataset, write_tile_store
from neuroblastoma_cnn.pipelines.ingestion import create_pipeline, nodes
from neuroblastoma_cnn.pipelines.ingestion.nodes import (
    ImageRejected,
    NoUsableImagesError,
    RawDataChangedError,
    TilingConfig,
    build_image_manifest,
    load_rgb,
    resize_tile,
    tile_image,
    tile_images,
    tile_positions,
    tissue_fraction,
    tissue_mask,
)

PINK = (200, 110, 190)  # eosin/haematoxylin-like: saturated, not bright
WHITE = (245, 245, 245)
PARAMS = {
    "extensions": [".png", ".jpg", ".tif"],
    "group_pattern": None,
    "max_image_pixels": 1_000_000,
    "min_image_size": 16,
    "tile_size": 32,
    "stride": 32,
    "min_tissue_fraction": 0.5,
    "input_size": 16,
    "shard_size": 4,
}


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
    assert tissue_fraction(np.full((8, 8, 3), PINK, np.uint8)) == 1.0
    assert tissue_fraction(np.full((8, 8, 3), WHITE, np.uint8)) == 0.0
    assert tissue_fraction(np.full((8, 8, 3), (255, 229, 255), np.uint8)) == 0.0  # fat, tinted
    assert tissue_fraction(np.zeros((8, 8, 3), np.uint8)) == 0.0  # black border
    assert tissue_fraction(np.full((8, 8, 3), 90, np.uint8)) == 0.0  # grey debris
    half = np.full((8, 8, 3), WHITE, np.uint8)
    half[:, :4] = PINK
    assert tissue_fraction(half) == pytest.approx(0.5)


def test_tissue_thresholds_are_configurable() -> None:
    pale = np.full((4, 4, 3), (210, 190, 205), np.uint8)  # saturation ~0.095, darkest 190
    assert tissue_fraction(pale) == 1.0
    assert tissue_fraction(pale, min_saturation=0.2) == 0.0
    assert tissue_fraction(pale, white_level=180) == 0.0


def test_tissue_mask_rejects_non_rgb_uint8() -> None:
    with pytest.raises(ValueError, match="uint8"):
        tissue_mask(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        tissue_mask(np.zeros((4, 4), np.uint8))


# ----------------------------------------------------------------------------- tiles


def test_tile_positions_grid_and_edges() -> None:
    assert tile_positions(256, 192, 128, 128) == [(0, 0), (128, 0)]
    assert tile_positions(256, 192, 128, 64) == [
        (0, 0), (64, 0), (128, 0), (0, 64), (64, 64), (128, 64)
    ]
    assert tile_positions(256, 192, 128, None) == [(0, 0), (128, 0)]
    assert tile_positions(100, 300, 128, 128) == []
    assert tile_positions(100, 300, None, None) == [(0, 0)]


def test_tile_image_drops_background_and_keeps_coordinates() -> None:
    rgb = np.full((64, 96, 3), WHITE, np.uint8)
    rgb[:, :32] = tissue(32, 64)  # left column of tiles is tissue
    rgb[:32, 32:64] = tissue(32, 32, seed=1)[:, :32]
    rgb[:32, 48:64] = WHITE  # tile (32, 0) is half tissue
    tiles = tile_image(rgb, tile_size=32, stride=32, min_tissue_fraction=0.5, input_size=16)
    assert [(t.x, t.y) for t in tiles] == [(0, 0), (32, 0), (0, 32)]
    assert [t.tissue_fraction for t in tiles] == pytest.approx([1.0, 0.5, 1.0])
    for tile in tiles:
        assert tile.tile.dtype == np.uint8
        assert tile.tile.shape == (16, 16, 3)
    # unpacks as (tile, x, y, tissue_fraction), the documented tuple
    pixels, x, y, fraction = tiles[1]
    np.testing.assert_array_equal(pixels, resize_tile(rgb[0:32, 32:64], 16))
    assert (x, y, fraction) == (32, 0, 0.5)
    everything = tile_image(rgb, 32, 32, 0.0, 16)
    assert len(everything) == 6


def test_whole_image_is_one_tile_when_tile_size_is_null() -> None:
    rgb = tissue(40, 30)
    (only,) = tile_image(rgb, None, None, 0.25, 24)
    assert (only.x, only.y) == (0, 0)
    assert only.tile.shape == (24, 24, 3)
    assert tile_image(np.full((30, 40, 3), WHITE, np.uint8), None, None, 0.25, 24) == []


def test_resize_uses_pillow_bilinear_exactly() -> None:
    rgb = tissue(48, 48, seed=3)
    expected = np.asarray(Image.fromarray(rgb).resize((20, 20), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(resize_tile(rgb, 20), expected)
    assert nodes.RESIZE_FILTER == Image.Resampling.BILINEAR
    # a tile already at input size is passed through untouched
    np.testing.assert_array_equal(resize_tile(rgb, 48), rgb)


def test_tiling_config_from_params_matches_tile_image_and_validates() -> None:
    config = TilingConfig.from_params(PARAMS)
    assert (config.tile_size, config.effective_stride, config.input_size) == (32, 32, 16)
    rgb = tissue(64, 64)
    direct = tile_image(rgb, 32, 32, 0.5, 16)
    via_config = config.tile(rgb)
    assert len(direct) == len(via_config) == 4
    for a, b in zip(direct, via_config, strict=True):
        np.testing.assert_array_equal(a.tile, b.tile)
    for key, value in [("tile_size", 0), ("stride", -2), ("input_size", 2.5),
                       ("min_tissue_fraction", 1.5), ("tissue_white_level", 300)]:
        with pytest.raises(ValueError, match=key):
            TilingConfig.from_params({**PARAMS, key: value})


# ----------------------------------------------------------------------------- decoding


def test_load_rgb_round_trips_png_and_names_bad_files(tmp_path: Path) -> None:
    rgb = tissue(20, 10)
    np.testing.assert_array_equal(load_rgb(save(tmp_path / "a.png", rgb)), rgb)
    (tmp_path / "b.jpg").write_text("not an image")
    with pytest.raises(ImageRejected, match=r"b\.jpg.*not a readable image") as info:
        load_rgb(tmp_path / "b.jpg")
    assert info.value.reason.startswith("not a readable image")
    with pytest.raises(ImageRejected, match="cannot read"):
        load_rgb(tmp_path / "missing.png")
    with pytest.raises(ImageRejected, match="decompression bomb"):
        load_rgb(tmp_path / "a.png", max_image_pixels=100)


# ----------------------------------------------------------------------------- manifest


def make_raw(root: Path) -> Path:
    """Two classes: A with patient folders, B with images straight in the class folder."""
    save(root / "A" / "P1" / "a1.png", tissue(64, 64, 1))
    save(root / "A" / "P1" / "a2.png", tissue(64, 48, 2))
    save(root / "A" / "P2" / "a3.png", tissue(64, 64, 3))
    save(root / "B" / "S7_x.png", tissue(64, 64, 4))
    save(root / "B" / "S7_y.png", tissue(96, 64, 5))
    save(root / "B" / "S8_z.png", tissue(32, 32, 6))
    return root


def test_manifest_columns_groups_and_tile_counts(tmp_path: Path) -> None:
    root = make_raw(tmp_path / "raw")
    manifest, rejected = build_image_manifest(root, PARAMS)
    assert rejected.empty
    assert list(manifest.columns[:7]) == [
        "image_path", "label", "group", "width", "height", "mode", "sha256"
    ]
    rows = manifest.set_index("image_path")
    assert list(rows.index) == ["A/P1/a1.png", "A/P1/a2.png", "A/P2/a3.png",
                                "B/S7_x.png", "B/S7_y.png", "B/S8_z.png"]
    assert list(rows["label"]) == ["A", "A", "A", "B", "B", "B"]
    # patient folder -> group; without one and without a pattern, each image is its own group
    assert list(rows["group"]) == ["P1", "P1", "P2", "B/S7_x.png", "B/S7_y.png", "B/S8_z.png"]
    assert (rows.loc["B/S7_y.png", "width"], rows.loc["B/S7_y.png", "height"]) == (96, 64)
    assert set(rows["mode"]) == {"RGB"}
    digest = hashlib.sha256((root / "A/P1/a2.png").read_bytes()).hexdigest()
    assert rows.loc["A/P1/a2.png", "sha256"] == digest
    # 64x48 with 32px tiles: 2 tiles; 96x64: 6 tiles; 32x32: 1 tile
    assert list(rows["n_tiles"]) == [4, 2, 4, 4, 6, 1]
    assert list(rows["n_tiles_background"]) == [0] * 6


def test_group_pattern_names_patients_and_rejects_unmatched_files(tmp_path: Path) -> None:
    root = make_raw(tmp_path / "raw")
    save(root / "B" / "nopatient.png", tissue(64, 64, 9))
    params = {**PARAMS, "group_pattern": r"^(?P<group>S\d+)_"}
    manifest, rejected = build_image_manifest(root, params)
    groups = dict(zip(manifest["image_path"], manifest["group"], strict=True))
    assert groups["B/S7_x.png"] == groups["B/S7_y.png"] == "S7"
    assert groups["B/S8_z.png"] == "S8"
    assert groups["A/P1/a1.png"] == "P1"  # a patient folder wins over the pattern
    assert rejected.set_index("file").loc["B/nopatient.png", "reason"].startswith(
        "group_pattern does not match"
    )
    with pytest.raises(ValueError, match="named group 'group'"):
        build_image_manifest(root, {**PARAMS, "group_pattern": r"^S\d+"})
    with pytest.raises(ValueError, match="not a valid regex"):
        build_image_manifest(root, {**PARAMS, "group_pattern": r"(?P<group>"})


def test_background_only_image_is_reported_and_not_tiled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_raw(tmp_path / "raw")
    save(root / "A" / "P2" / "blank.png", np.full((64, 64, 3), WHITE, np.uint8))
    manifest, rejected = build_image_manifest(root, PARAMS)
    assert "1 images have no tile with enough tissue" in caplog.text
    assert "A/P2/blank.png" in caplog.text
    row = manifest.set_index("image_path").loc["A/P2/blank.png"]
    assert (row["n_tiles"], row["n_tiles_background"]) == (0, 4)
    reason = rejected.set_index("file").loc["A/P2/blank.png", "reason"]
    assert reason.startswith("mostly background: no tile with tissue fraction >= 0.5")
    paths = {meta["image_path"] for _, meta in tile_images(root, manifest, PARAMS)}
    assert "A/P2/blank.png" not in paths
    assert len(paths) == 6


def test_tile_images_streams_contract_metadata(tmp_path: Path) -> None:
    root = make_raw(tmp_path / "raw")
    manifest, _ = build_image_manifest(root, PARAMS)
    stream = tile_images(root, manifest, PARAMS)
    assert stream.metadata["classes"] == ["A", "B"]
    assert (stream.metadata["input_size"], stream.metadata["tile_size"],
            stream.metadata["stride"]) == (16, 32, 32)
    assert stream.metadata["ingestion"]["min_tissue_fraction"] == 0.5
    store = write_tile_store(tmp_path / "store", stream, stream.metadata, shard_size=4)
    assert len(store) == int(manifest["n_tiles"].sum()) == 21
    assert store.tile_shape == (16, 16, 3)
    index = store.index
    for column in ("image_path", "label", "group", "x", "y", "tissue_fraction"):
        assert column in index.columns
    first = index[index["image_path"] == "A/P1/a2.png"]
    assert list(zip(first["x"], first["y"], strict=True)) == [(0, 0), (32, 0)]
    assert set(first["group"]) == {"P1"}
    assert set(first["label"]) == {"A"}
    # the stored pixels are the ones tile_image makes for the same file (prediction reuses it)
    expected = tile_image(load_rgb(root / "A/P1/a2.png"), 32, 32, 0.5, 16)
    np.testing.assert_array_equal(store.get(first["tile_id"]), np.stack([t.tile for t in expected]))
    # a stream can be iterated again and gives the same tiles
    assert sum(1 for _ in stream) == 21


def test_tile_images_decodes_lazily_one_image_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_raw(tmp_path / "raw")
    manifest, _ = build_image_manifest(root, PARAMS)
    decoded: list[str] = []
    original = nodes.decode_image

    def counting(data: bytes, name: str, max_image_pixels: int):  # type: ignore[no-untyped-def]
        decoded.append(name)
        return original(data, name, max_image_pixels)

    monkeypatch.setattr(nodes, "decode_image", counting)
    stream = tile_images(root, manifest, PARAMS)
    assert decoded == []  # nothing is decoded until the store pulls tiles
    iterator = iter(stream)
    for _ in range(4):  # the 4 tiles of the first image
        next(iterator)
    assert len(decoded) == 1
    next(iterator)
    assert len(decoded) == 2


def test_tile_images_refuses_raw_files_changed_since_the_manifest(tmp_path: Path) -> None:
    root = make_raw(tmp_path / "raw")
    manifest, _ = build_image_manifest(root, PARAMS)
    save(root / "A" / "P1" / "a1.png", tissue(64, 64, 42))
    with pytest.raises(RawDataChangedError, match=r"a1\.png.*changed since the image manifest"):
        list(tile_images(root, manifest, PARAMS))
    (root / "A" / "P1" / "a1.png").unlink()
    with pytest.raises(RawDataChangedError, match="cannot be read"):
        list(tile_images(root, manifest, PARAMS))


def test_tile_images_without_any_tissue_tile_is_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    save(root / "A" / "blank.png", np.full((64, 64, 3), WHITE, np.uint8))
    manifest, rejected = build_image_manifest(root, PARAMS)
    assert list(rejected["reason"].str.split(":").str[0]) == ["mostly background"]
    with pytest.raises(NoUsableImagesError, match="min_tissue_fraction"):
        tile_images(root, manifest, PARAMS)


def test_tile_store_dataset_uses_the_ingestion_shard_size(tmp_path: Path) -> None:
    root = make_raw(tmp_path / "raw")
    manifest, _ = build_image_manifest(root, PARAMS)
    dataset = TileStoreDataset(filepath=str(tmp_path / "tiles"), version=Version(None, None))
    dataset.save(tile_images(root, manifest, {**PARAMS, "shard_size": 5}))
    store = dataset.load()
    assert len(store) == 21
    assert store.metadata["shards"] == 5  # ceil(21 / 5), not the dataset default of 512


def test_summary_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_raw(tmp_path / "raw")
    (root / "A" / "notes.txt").write_text("x")
    caplog.set_level(logging.INFO, logger=nodes.__name__)
    manifest, _ = build_image_manifest(root, PARAMS)
    list(tile_images(root, manifest, PARAMS))
    text = caplog.text
    assert "6 images accepted, 1 entries rejected" in text
    assert "A 3/1, B 3/0" in text
    assert "1 not an image extension" in text
    assert "21 tiles kept, 0 dropped" in text


# ----------------------------------------------------------------------------- dataset, pipeline


def test_image_folder_dataset_is_read_only(tmp_path: Path) -> None:
    root = make_raw(tmp_path / "raw")
    dataset = ImageFolderDataset(path=str(root))
    assert dataset.load() == root
    assert dataset.exists()
    assert not ImageFolderDataset(path=str(tmp_path / "nope")).exists()
    with pytest.raises(DatasetError, match="raw data is read-only"):
        dataset.save(pd.DataFrame())


def test_pipeline_wiring() -> None:
    pipeline = create_pipeline()
    names = {node.name: node for node in pipeline.nodes}
    assert set(names) == {"build_image_manifest", "tile_images"}
    assert names["build_image_manifest"].outputs == ["image_manifest", "rejected_images"]
    assert names["tile_images"].inputs == ["raw_images", "image_manifest", "params:ingestion"]
    assert pipeline.all_outputs() == {"image_manifest", "rejected_images", "tiles"}
    assert pipeline.inputs() == {"raw_images", "params:ingestion"}
    assert all("data" in node.tags for node in pipeline.nodes)


def test_min_image_size_applies_when_the_whole_image_is_the_tile(tmp_path: Path) -> None:
    root = make_raw(tmp_path / "raw")
    save(root / "A" / "P2" / "tiny.png", tissue(10, 40, 7))
    manifest, rejected = build_image_manifest(root, {**PARAMS, "tile_size": None})
    assert "A/P2/tiny.png" not in set(manifest["image_path"])
    assert rejected.set_index("file").loc["A/P2/tiny.png", "reason"] == (
        "too small: image is 10x40, min_image_size is 16"
    )
    assert set(manifest["n_tiles"]) == {1}  # every other image is one whole-image tile


def test_numeric_looking_names_stay_strings_after_saving(tmp_path: Path) -> None:
    """Class "1" and patient "007" must not come back as numbers from the catalog or the store."""
    import yaml
    from kedro_datasets.pandas import CSVDataset

    root = tmp_path / "raw"
    save(root / "1" / "007" / "a.png", tissue(64, 64, 1))
    save(root / "2" / "NA" / "b.png", tissue(64, 64, 2))
    manifest, _ = build_image_manifest(root, PARAMS)
    catalog = yaml.safe_load((Path(__file__).parents[1] / "conf/base/catalog.yml").read_text())
    dataset = CSVDataset(
        filepath=str(tmp_path / "manifest.csv"), load_args=catalog["image_manifest"]["load_args"]
    )
    dataset.save(manifest)
    loaded = dataset.load()
    assert list(loaded["label"]) == ["1", "2"]
    assert list(loaded["group"]) == ["007", "NA"]
    stream = tile_images(root, loaded, PARAMS)
    assert stream.metadata["classes"] == ["1", "2"]
    store = write_tile_store(tmp_path / "store", stream, stream.metadata)
    assert set(store.index["label"]) == {"1", "2"}
    assert set(store.index["group"]) == {"007", "NA"}
