"""The ingestion pipeline run through Kedro (env `tiny`) on the real BACH subset.

The subset is 4 classes x 3 patient folders x 2 images of 256x192 px; `tiny` cuts 128 px tiles
every 128 px (2 grid positions per image) and resizes them to 32 px.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from PIL import Image

from neuroblastoma_cnn.images.preprocessing import Preprocessing

pytestmark = pytest.mark.integration

RAW = Path("data/01_raw/images")


def _catalog(project: Path) -> Any:
    bootstrap_project(project)
    with KedroSession.create(project_path=project, env="tiny") as session:
        return session.load_context().catalog


def _versions(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def test_ingestion_pipeline_end_to_end(
    kedro_project: Path, run_kedro: Callable[..., dict[str, Any]]
) -> None:
    run_kedro("ingestion")
    catalog = _catalog(kedro_project)
    manifest = catalog.load("image_manifest")
    rejected = catalog.load("rejected_images")
    store = catalog.load("tiles")
    _check_first_run(kedro_project, manifest, rejected, store)
    _check_reruns_add_versions(kedro_project, manifest, store, run_kedro)


def _check_first_run(kedro_project: Path, manifest: Any, rejected: Any, store: Any) -> None:
    # one row per image; class = first folder, group = patient folder
    assert len(manifest) == 24
    parts = manifest["image_path"].str.split("/")
    assert list(manifest["label"]) == list(parts.str[0])
    assert list(manifest["group"]) == list(parts.str[1])
    assert manifest.groupby("label")["group"].nunique().tolist() == [3, 3, 3, 3]
    assert set(manifest[["width", "height"]].itertuples(index=False, name=None)) == {(256, 192)}
    assert set(rejected["reason"].str.split(":").str[0]) <= {"mostly background"}

    # tiles: as many as the tiling function keeps for each image, with its coordinates
    record = Preprocessing.from_store(store)
    config = record.tiling
    assert (config.tile_size, config.effective_stride, config.input_size) == (128, 128, 32)
    assert len(config.positions(256, 192)) == 2
    assert store.tile_shape == (32, 32, 3)
    assert store.metadata["classes"] == sorted(set(manifest["label"]))
    expected_total = 0
    for image_path in manifest["image_path"]:
        rgb = record.image_checks.read(kedro_project / RAW / image_path, image_path,
                                       config.tile_size)
        expected = config.tile(rgb)
        rows = store.index[store.index["image_path"] == image_path]
        assert list(zip(rows["x"], rows["y"], strict=True)) == [(t.x, t.y) for t in expected]
        if expected:
            np.testing.assert_array_equal(
                store.get(rows["tile_id"]), np.stack([t.tile for t in expected])
            )
        expected_total += len(expected)
    assert len(store) == expected_total == int(manifest["n_tiles"].sum())
    assert set(store.index["group"]) == set(manifest["group"])
    assert store.metadata["shards"] == math.ceil(expected_total / 64)  # tiny shard_size


def _check_reruns_add_versions(
    kedro_project: Path, manifest: Any, store: Any, run_kedro: Callable[..., dict[str, Any]]
) -> None:
    # a second run, on one more image, adds versions and replaces nothing
    first_class = sorted(set(manifest["label"]))[0]
    source = kedro_project / RAW / manifest["image_path"].iloc[0]
    extra = kedro_project / RAW / first_class / "P99" / "flipped.png"
    extra.parent.mkdir()
    Image.open(source).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(extra)
    run_kedro("ingestion")
    data = kedro_project / "data"
    manifest_versions = _versions(data / "02_intermediate" / "image_manifest.csv")
    tile_versions = _versions(data / "03_primary" / "tiles")
    assert len(manifest_versions) == 2
    assert len(_versions(data / "02_intermediate" / "rejected_images.csv")) == 2
    assert len(tile_versions) == 2
    latest = _catalog(kedro_project)
    assert len(latest.load("image_manifest")) == 25
    assert len(latest.load("tiles")) > len(store)

    # the first version is still loadable, by `load_versions` as `kedro run` uses it
    first = manifest_versions[0]
    assert len(latest.load("image_manifest", version=first)) == 24
    with KedroSession.create(project_path=kedro_project, env="tiny") as session:
        session.run(
            pipeline_names=["ingestion"], node_names=["tile_images"],
            load_versions={"image_manifest": first},
        )
    third = _versions(data / "03_primary" / "tiles")
    assert len(third) == 3
    retiled = latest.load("tiles", version=third[-1])
    assert set(retiled.index["image_path"]) == set(manifest["image_path"])
    assert len(retiled) == len(store)
