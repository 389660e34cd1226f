"""The tile store is the contract between stages: test that it round-trips and never overwrites."""

from pathlib import Path

import numpy as np
import pytest
from kedro.io.core import DatasetError, Version

from neuroblastoma_cnn.datasets import TileStore, TileStoreDataset, TileStream, write_tile_store


def _records(n: int, size: int = 4):
    return (
        (np.full((size, size, 3), i, np.uint8), {"label": f"c{i % 2}", "i": i}) for i in range(n)
    )


def test_round_trip_across_shards(tmp_path: Path) -> None:
    store = write_tile_store(tmp_path / "s", _records(7), {"classes": ["c0", "c1"]}, shard_size=3)
    assert len(store) == 7
    assert store.metadata["shards"] == 3
    assert store.metadata["classes"] == ["c0", "c1"]
    assert store.tile_shape == (4, 4, 3)
    assert list(store.index.columns[:3]) == ["tile_id", "shard", "offset"]
    tiles = store.get([6, 0, 3])
    assert tiles[:, 0, 0, 0].tolist() == [6, 0, 3]
    batches = list(store.iter_batches(batch_size=4))
    assert [len(rows) for rows, _ in batches] == [4, 3]
    assert batches[1][1][:, 0, 0, 0].tolist() == [4, 5, 6]


def test_refuses_overwrite_and_bad_tiles(tmp_path: Path) -> None:
    write_tile_store(tmp_path / "s", _records(2))
    with pytest.raises(DatasetError, match="Refusing to overwrite"):
        write_tile_store(tmp_path / "s", _records(2))
    with pytest.raises(DatasetError, match="uint8"):
        write_tile_store(tmp_path / "f", [(np.zeros((4, 4, 3), np.float32), {})])
    assert not (tmp_path / "f").exists(), "a failed write must leave no store behind"
    with pytest.raises(DatasetError, match="one shape"):
        write_tile_store(
            tmp_path / "g",
            [(np.zeros((4, 4, 3), np.uint8), {}), (np.zeros((5, 4, 3), np.uint8), {})],
        )


def test_unknown_ids_and_missing_store(tmp_path: Path) -> None:
    store = write_tile_store(tmp_path / "s", _records(2))
    with pytest.raises(KeyError, match="not in store"):
        store.get([5])
    with pytest.raises(DatasetError, match="not a tile store"):
        TileStore(tmp_path / "nothing")


def test_versioned_dataset_keeps_every_version(tmp_path: Path) -> None:
    path = str(tmp_path / "tiles")
    first = TileStoreDataset(filepath=path, shard_size=2, version=Version(None, None))
    first.save(TileStream(lambda: _records(3), {"input_size": 4}))
    second = TileStoreDataset(filepath=path, shard_size=2, version=Version(None, None))
    second.save(first.load())  # copying a store is allowed and makes a new version
    versions = second.list_versions(full_path=False)
    assert len(versions) == 2
    old = TileStoreDataset(filepath=path, version=Version(versions[1], None)).load()
    assert old.metadata["input_size"] == 4
    np.testing.assert_array_equal(old.get(), second.load().get())
