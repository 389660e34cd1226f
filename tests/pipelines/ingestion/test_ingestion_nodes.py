"""Unit tests of the ingestion functions on tiny synthetic images (no Kedro, no BACH)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from _params import params
from kedro.io.core import DatasetError, Version
from kedro_datasets.pandas import CSVDataset
from PIL import Image

from neuroblastoma_cnn.core.errors import ParameterError
from neuroblastoma_cnn.datasets import ImageFolderDataset, TileStoreDataset, write_tile_store
from neuroblastoma_cnn.images.decoding import ImageChecks
from neuroblastoma_cnn.images.preprocessing import Preprocessing
from neuroblastoma_cnn.pipelines.ingestion import create_pipeline, nodes
from neuroblastoma_cnn.pipelines.ingestion.nodes import (
    NoUsableImagesError,
    RawDataChangedError,
    build_image_manifest,
    tile_images,
)

PINK = (200, 110, 190)  # eosin/haematoxylin-like: saturated, not bright
WHITE = (245, 245, 245)
SETTINGS = {
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
PARAMS = params("ingestion", **SETTINGS)


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
    manifest, rejected = build_image_manifest(
        root, params("ingestion", **{**SETTINGS, "group_pattern": r"^(?P<group>S\d+)_"}))
    groups = dict(zip(manifest["image_path"], manifest["group"], strict=True))
    assert groups["B/S7_x.png"] == groups["B/S7_y.png"] == "S7"
    assert groups["B/S8_z.png"] == "S8"
    assert groups["A/P1/a1.png"] == "P1"  # a patient folder wins over the pattern
    assert rejected.set_index("file").loc["B/nopatient.png", "reason"].startswith(
        "group_pattern does not match"
    )
    with pytest.raises(ParameterError, match=r"ingestion.group_pattern = .*named group 'group'"):
        params("ingestion", **{**SETTINGS, "group_pattern": r"^S\d+"})
    with pytest.raises(ParameterError, match="not a valid regular expression"):
        params("ingestion", **{**SETTINGS, "group_pattern": r"(?P<group>"})


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
    record = Preprocessing.from_metadata(stream.metadata, "stream")
    assert record.tiling == PARAMS.tiling
    assert record.image_checks == PARAMS.image_checks
    assert record.architecture is None
    assert "ingestion" not in stream.metadata  # each value once: the record only
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
    # the stored pixels are the ones the record's tiling makes for the file (prediction uses it)
    rgb = ImageChecks.model_validate(stream.metadata["image_checks"]).read(
        root / "A/P1/a2.png", "a2.png", 32)
    expected = record.tiling.tile(rgb)
    np.testing.assert_array_equal(store.get(first["tile_id"]), np.stack([t.tile for t in expected]))
    # a stream can be iterated again and gives the same tiles
    assert sum(1 for _ in stream) == 21


def test_tile_images_decodes_lazily_one_image_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_raw(tmp_path / "raw")
    manifest, _ = build_image_manifest(root, PARAMS)
    decoded: list[str] = []
    original = nodes.decode_scaled

    def counting(data: bytes, name: str, *args):  # type: ignore[no-untyped-def]
        decoded.append(name)
        return original(data, name, *args)

    monkeypatch.setattr(nodes, "decode_scaled", counting)
    # one process (workers: 1): the serial path is lazy; the parallel one keeps a bounded
    # look-ahead (tests/pipelines/ingestion/test_parallel_ingestion.py)
    stream = tile_images(root, manifest, PARAMS.model_copy(update={"workers": 1}))
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
    dataset.save(tile_images(root, manifest, params("ingestion", **{**SETTINGS, "shard_size": 5})))
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
    manifest, rejected = build_image_manifest(
        root, params("ingestion", **{**SETTINGS, "tile_size": None}))
    assert "A/P2/tiny.png" not in set(manifest["image_path"])
    assert rejected.set_index("file").loc["A/P2/tiny.png", "reason"] == (
        "too small: image is 10x40, min_image_size is 16"
    )
    assert set(manifest["n_tiles"]) == {1}  # every other image is one whole-image tile


def test_numeric_looking_names_stay_strings_after_saving(tmp_path: Path) -> None:
    """Class "1" and patient "007" must not come back as numbers from the catalog or the store."""
    root = tmp_path / "raw"
    save(root / "1" / "007" / "a.png", tissue(64, 64, 1))
    save(root / "2" / "NA" / "b.png", tissue(64, 64, 2))
    manifest, _ = build_image_manifest(root, PARAMS)
    catalog = yaml.safe_load((Path(__file__).parents[3] / "conf/base/catalog.yml").read_text())
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
