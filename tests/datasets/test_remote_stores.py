"""The project's own datasets on non-local file systems: fsspec's ``memory://`` and an S3 API on
loopback (moto's server with s3fs), with Kedro versioning, lineage and promotion sidecars."""

from __future__ import annotations

import contextlib
import json
import uuid

import fsspec
import keras
import numpy as np
import pytest
from _params import store_metadata
from kedro.io.core import Version

from neuroblastoma_cnn.core.storage import FsPath
from neuroblastoma_cnn.datasets import KerasModelDataset, TileStoreDataset, TileStream
from neuroblastoma_cnn.datasets.png_folder import PngFolderDataset
from neuroblastoma_cnn.tracking import lineage, promotion

V1, V2 = "2026-01-01T00.00.00.000Z", "2026-02-01T00.00.00.000Z"


def _records(n: int):
    return ((np.full((4, 4, 3), i, np.uint8), {"label": f"c{i % 2}", "group": f"{i:03d}"})
            for i in range(n))


def _tiny_model() -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, outputs, name="tiny")
    model.preprocessing = {**store_metadata(["a", "b"], input_size=8), "architecture": "resnet34"}
    return model


@pytest.fixture(scope="module")
def s3():
    """A bucket on moto's S3 server on 127.0.0.1 (no network, no real credentials)."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    credentials = {"key": "testing", "secret": "testing",  # moto accepts any pair
                   "client_kwargs": {"endpoint_url": f"http://{host}:{port}",
                                     "region_name": "eu-west-1"}}
    fs = fsspec.filesystem("s3", **credentials, skip_instance_cache=True)
    fs.mkdir("nb-bucket")
    yield credentials
    server.stop()


@pytest.fixture
def memory_root():
    root = f"memory:///nb-{uuid.uuid4().hex[:8]}"  # Kedro reads memory://x/ as a host
    yield root
    with contextlib.suppress(FileNotFoundError):
        fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)


def _roots(request, memory_root):
    if request.param == "memory":
        return memory_root, {}
    credentials = request.getfixturevalue("s3")
    return f"s3://nb-bucket/{uuid.uuid4().hex[:8]}", credentials


@pytest.fixture(params=["memory", "s3"])
def remote(request, memory_root):
    return _roots(request, memory_root)


def test_a_tile_store_is_saved_and_loaded_with_versions(remote):
    root, credentials = remote
    path = f"{root}/03_primary/tiles"
    first = TileStoreDataset(path, shard_size=2, version=Version(None, V1),
                             credentials=credentials)
    first.save(TileStream(lambda: _records(5), {"classes": ["c0", "c1"]}))
    second = TileStoreDataset(path, shard_size=2, version=Version(None, V2),
                              credentials=credentials)
    second.save(TileStream(lambda: _records(3), {"classes": ["c0", "c1"]}))

    latest = TileStoreDataset(path, version=Version(None, None), credentials=credentials)
    assert latest.resolve_load_version() == V2
    store = latest.load()
    assert isinstance(store.path, FsPath) and len(store) == 3
    assert store.index["group"].tolist() == ["000", "001", "002"]  # stays text
    pinned = TileStoreDataset(path, version=Version(V1, None), credentials=credentials).load()
    assert len(pinned) == 5 and pinned.metadata["shards"] == 3
    assert pinned.get([4, 0])[:, 0, 0, 0].tolist() == [4, 0]  # shards downloaded on demand
    assert pinned.producer_metadata["classes"] == ["c0", "c1"]


def test_a_partial_remote_store_is_not_a_version(remote):
    """store.json is uploaded last: a version folder without it (an interrupted upload) is
    skipped when the latest version is resolved."""
    root, credentials = remote
    path = f"{root}/tiles"
    TileStoreDataset(path, version=Version(None, V1), credentials=credentials).save(
        TileStream(lambda: _records(2)))
    dataset = TileStoreDataset(path, version=Version(None, None), credentials=credentials)
    dataset._fs.pipe_file(f"{dataset._get_versioned_path(V2)}/shard-00000.npy", b"half")
    assert TileStoreDataset(path, version=Version(None, None),
                            credentials=credentials).resolve_load_version() == V1


def test_a_keras_model_with_promotion_and_lineage_sidecars(remote):
    root, credentials = remote
    path = f"{root}/06_models/resnet34/model.keras"
    dataset = KerasModelDataset(path, promotion=True, version=Version(None, V1),
                                credentials=credentials)
    model = _tiny_model()
    dataset.save(model)
    folder = dataset.saved_path().parent
    assert isinstance(folder, FsPath)
    assert promotion.read_status(folder)["status"] == "pending"
    dataset.promote(epochs=1)
    assert promotion.is_usable(folder)

    found = lineage.version_folder(dataset, V1)
    assert found == folder
    lineage.write_lineage(found, {"dataset": "resnet34.model", "version": V1})
    with pytest.raises(FileExistsError):
        lineage.write_lineage(found, {"dataset": "again"})
    assert lineage.read_lineage(found)["dataset"] == "resnet34.model"

    loaded = KerasModelDataset(path, version=Version(None, None),
                               credentials=credentials).load()
    batch = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(loaded.predict_on_batch(batch), model.predict_on_batch(batch),
                               rtol=1e-6)
    assert list(loaded.preprocessing.classes) == ["a", "b"]
    names = sorted(p.name for p in folder.rglob("*"))
    assert names == ["lineage.json", "model.keras", "promotion.json"]


def test_png_folders_on_memory(memory_root):
    path = f"{memory_root}/08_reporting/gradcam"
    picture = np.zeros((3, 3, 3), np.uint8)
    PngFolderDataset(path, version=Version(None, V1)).save({"a/b": picture, "c": lambda: None})
    PngFolderDataset(path, version=Version(None, V2)).save({})  # an empty version counts
    latest = PngFolderDataset(path, version=Version(None, None))
    assert latest.resolve_load_version() == V2 and latest.load() == {}
    loaded = PngFolderDataset(path, version=Version(V1, None)).load()
    assert list(loaded) == ["a/b.png"]
    assert loaded["a/b.png"]().size == (3, 3)
    assert json.loads(json.dumps(PngFolderDataset(path)._describe(), default=str))
