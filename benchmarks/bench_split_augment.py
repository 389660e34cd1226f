"""Times the splitting and augmentation nodes and prints one JSON line.

Usage::

    python benchmarks/bench_split_augment.py --store data/03_primary/tiles/<version>/tiles
    python benchmarks/bench_split_augment.py --tiles 3600 --size 224 --classes 4

Without ``--store`` it builds a synthetic store (random pixels) of ``--tiles`` tiles in
``--classes`` classes, ``--tiles-per-image`` tiles per image and one image per group, like
BACH tiled at 512 px (12 tiles per 2048x1536 image, no patient ids). Everything is written to a
temporary folder (or ``--workdir``) and removed afterwards unless ``--keep``.

Two memory figures per stage: ``peak_rss_mb`` is the process's high-water mark (it never goes
down, and counts memory-mapped shard pages and TensorFlow's ~400 MB of shared libraries), and
``peak_anon_mb`` is the largest anonymous (heap) memory seen by a 20 ms sampler during the stage,
which is what would grow if a stage loaded the whole store.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from neuroblastoma_cnn.datasets import TileStore, write_tile_store
from neuroblastoma_cnn.params import AugmentationParams, SplittingParams, base_group
from neuroblastoma_cnn.pipelines.augmentation.nodes import (
    augment_training_set,
    plot_augmentation_grid,
)
from neuroblastoma_cnn.pipelines.splitting.nodes import (
    check_no_leakage,
    split_tiles,
    summarise_split,
)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def anon_mb() -> float:
    """Current anonymous resident memory (Linux); 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class AnonPeak:
    """Samples anonymous memory in a background thread while a stage runs."""

    def __enter__(self) -> AnonPeak:
        self.peak = anon_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, anon_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = round(max(self.peak, anon_mb()), 1)


def synthetic_records(
    n_tiles: int, size: int, n_classes: int, tiles_per_image: int, seed: int = 0
) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    for i in range(n_tiles):
        label = f"class{i * n_classes // n_tiles}"
        image = i // tiles_per_image
        tile = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        yield (
            tile,
            {
                "image_path": f"{label}/img{image:05d}.png",
                "label": label,
                "group": f"{label}/img{image:05d}.png",
                "x": 0,
                "y": 0,
                "tissue_fraction": 1.0,
            },
        )


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="an existing tile store folder")
    parser.add_argument("--tiles", type=int, default=3600)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--tiles-per-image", type=int, default=12)
    parser.add_argument("--strategy", default="patient", choices=["patient", "image"])
    parser.add_argument("--target", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep", action="store_true")
    return parser.parse_args(argv)


def _split(tiles: TileStore, args: argparse.Namespace, result: dict[str, Any]) -> tuple:
    split_params = SplittingParams.parse(
        base_group("splitting", strategy=args.strategy, seed=args.seed), "splitting")
    t0 = time.perf_counter()
    with AnonPeak() as mem:
        table = check_no_leakage(split_tiles(tiles, split_params), split_params)
        summary = summarise_split(table)
    result["split_s"] = round(time.perf_counter() - t0, 3)
    result["split_peak_rss_mb"] = round(peak_rss_mb(), 1)
    result["split_peak_anon_mb"] = mem.peak
    result["split_tiles"] = table["split"].value_counts().to_dict()
    return table, summary


def _augment(tiles: TileStore, table: Any, args: argparse.Namespace, workdir: Path,
             result: dict[str, Any]) -> None:
    aug_params = AugmentationParams.parse(
        base_group("augmentation", target_per_class=args.target, seed=args.seed,
                   batch_size=args.batch_size), "augmentation")
    t0 = time.perf_counter()
    with AnonPeak() as mem:
        stream = augment_training_set(tiles, table, aug_params)
        augmented = write_tile_store(workdir / "augmented", stream, stream.metadata)
    result["augment_s"] = round(time.perf_counter() - t0, 3)
    result["augment_peak_rss_mb"] = round(peak_rss_mb(), 1)
    result["augment_peak_anon_mb"] = mem.peak
    counts = stream.metadata["class_counts"]
    result["train_originals"] = sum(c["original"] for c in counts.values())
    result["augmented_copies"] = sum(c["augmented"] for c in counts.values())
    result["augmented_store_tiles"] = len(augmented)
    result["copies_per_s"] = (
        round(result["augmented_copies"] / result["augment_s"], 1)
        if result["augmented_copies"]
        else None
    )
    t0 = time.perf_counter()
    fig = plot_augmentation_grid(augmented, aug_params)
    fig.savefig(workdir / "grid.png", dpi=100)
    result["grid_s"] = round(time.perf_counter() - t0, 3)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _arguments(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_split_augment_"))
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        if args.store:
            tiles = TileStore(args.store)
        else:
            tiles = write_tile_store(
                workdir / "tiles",
                synthetic_records(args.tiles, args.size, args.classes, args.tiles_per_image),
                {"classes": [f"class{k}" for k in range(args.classes)], "input_size": args.size},
            )
            result["build_store_s"] = round(time.perf_counter() - t0, 3)
        result.update(
            tiles=len(tiles),
            tile_shape=list(tiles.tile_shape),
            classes=len(tiles.metadata.get("classes") or []),
        )
        table, summary = _split(tiles, args, result)
        _augment(tiles, table, args, workdir, result)
        result["peak_rss_mb"] = round(peak_rss_mb(), 1)
        result["min_train_tiles_per_class"] = int(
            summary[summary["split"] == "train"]["tiles"].min()
        )
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    main()
