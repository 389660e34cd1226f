"""Ingestion on several processes: the same manifest and tile store bytes as one process, and a
bounded number of images in flight (memory does not grow with the number of images)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _params import params
from PIL import Image

from neuroblastoma_cnn.datasets import write_tile_store
from neuroblastoma_cnn.pipelines.ingestion import nodes
from neuroblastoma_cnn.pipelines.ingestion.nodes import build_image_manifest, tile_images

SETTINGS = {
    "extensions": [".png", ".jpg"],
    "max_image_pixels": 1_000_000,
    "min_image_size": 16,
    "tile_size": 32,
    "stride": 16,
    "min_tissue_fraction": 0.5,
    "input_size": 8,
    "shard_size": 5,
}


def tissue_with_glass(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rgb = np.clip(np.array([200, 110, 190]) + rng.integers(-30, 31, (height, width, 3)), 0, 255)
    rgb[: height // 2, : int(rng.integers(0, width))] = 245  # some glass: some tiles dropped
    return rgb.astype(np.uint8)


def make_raw(root: Path, n: int = 12) -> Path:
    for i in range(n):
        label = "AB"[i % 2]
        rgb = tissue_with_glass(96 + 16 * (i % 3), 64 + 8 * (i % 4), seed=i)
        path = root / label / f"P{i // 4}" / (f"img{i}.jpg" if i % 3 else f"img{i}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, "JPEG" if path.suffix == ".jpg" else "PNG")
        path.write_bytes(buffer.getvalue())
    return root


def ingest(root: Path, out: Path, **overrides: object) -> tuple[pd.DataFrame, pd.DataFrame]:
    settings = params("ingestion", **{**SETTINGS, **overrides})
    manifest, rejected = build_image_manifest(root, settings)
    stream = tile_images(root, manifest, settings)
    write_tile_store(out, stream, stream.metadata, shard_size=settings.shard_size)
    return manifest, rejected


@pytest.mark.parametrize("decoding", ["full", "reduced"])
def test_parallel_ingestion_writes_the_bytes_of_one_process(tmp_path: Path,
                                                            decoding: str) -> None:
    root = make_raw(tmp_path / "raw")
    serial = ingest(root, tmp_path / "one", workers=1, decoding=decoding)
    parallel = ingest(root, tmp_path / "two", workers=2, decoding=decoding)
    for one, two in zip(serial, parallel, strict=True):
        pd.testing.assert_frame_equal(one, two)
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == files
    assert "shard-00002.npy" in files  # several shards, written in order
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    tiles = pd.read_csv(tmp_path / "one" / "index.csv")
    assert 0 < len(tiles) < int(serial[0]["n_tiles"].sum() + serial[0]["n_tiles_background"]
                                .sum())  # glass tiles were dropped


def test_the_two_decoding_methods_keep_tiles_at_the_same_places(tmp_path: Path) -> None:
    root = make_raw(tmp_path / "raw")
    full, _ = ingest(root, tmp_path / "full", workers=1, decoding="full")
    reduced, _ = ingest(root, tmp_path / "reduced", workers=1, decoding="reduced")
    assert list(full["image_path"]) == list(reduced["image_path"])
    kept_full = pd.read_csv(tmp_path / "full" / "index.csv")
    kept_reduced = pd.read_csv(tmp_path / "reduced" / "index.csv")
    key = ["image_path", "x", "y"]
    both = kept_full[key].merge(kept_reduced[key])
    assert len(both) >= 0.9 * max(len(kept_full), len(kept_reduced))


def test_few_images_are_in_flight_however_many_there_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_raw(tmp_path / "raw", n=16)
    settings = params("ingestion", **SETTINGS, workers=2, decoding="reduced")
    manifest, _ = build_image_manifest(root, settings)
    in_flight: list[int] = []
    original = nodes.ordered_map

    def watched(fn, items, workers, **kwargs):  # type: ignore[no-untyped-def]
        counts = {"pulled": 0, "consumed": 0}

        def pulled():  # type: ignore[no-untyped-def]
            for item in items:
                counts["pulled"] += 1
                yield item

        for result in original(fn, pulled(), workers, **kwargs):
            in_flight.append(counts["pulled"] - counts["consumed"])
            counts["consumed"] += 1
            yield result

    monkeypatch.setattr(nodes, "ordered_map", watched)
    n_tiles = sum(1 for _ in tile_images(root, manifest, settings))
    assert n_tiles == int(manifest["n_tiles"].sum())
    assert len(in_flight) == 16  # one result per image, in order
    assert max(in_flight) <= 4  # 2 x workers images pulled and not consumed, never more
