"""Benchmark of the ingestion nodes (manifest + tiling + tile store), without the Kedro CLI.

Why: ingestion decodes every image twice (checks, then tiles) and must keep memory bounded as
the data grows; this measures wall time, throughput and peak RSS on a real folder.

    .venv/bin/python benchmarks/bench_ingestion.py [RAW] [--tile-size 512] [--stride 512]
        [--input-size 224] [--limit N]

RAW defaults to ../shared/data/bach/images (``<Class>/<file>.jpg``: each image is its own
group). The tile store is written to a temporary folder and deleted. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from neuroblastoma_cnn.datasets import write_tile_store
from neuroblastoma_cnn.pipelines.ingestion.nodes import build_image_manifest, tile_images

PROJECT = Path(__file__).resolve().parents[1]
DEFAULT_RAW = PROJECT.parent / "shared" / "data" / "bach" / "images"

logger = logging.getLogger("bench_ingestion")


def limited_view(raw: Path, limit: int, dest: Path) -> Path:
    """Symlinks the first ``limit`` files, taken from the classes in turn, into ``dest``."""
    per_class = [
        sorted(p for p in class_dir.rglob("*") if p.is_file())
        for class_dir in sorted(raw.iterdir())
        if class_dir.is_dir()
    ]
    chosen = [p for p in itertools.chain(*itertools.zip_longest(*per_class)) if p][:limit]
    for path in chosen:
        link = dest / path.relative_to(raw)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path.resolve())
    return dest


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def run(raw: Path, tile_size: int | None, stride: int | None, input_size: int,
        limit: int | None) -> dict[str, Any]:
    base = yaml.safe_load((PROJECT / "conf/base/parameters_ingestion.yml").read_text())
    params = {**base["ingestion"], "tile_size": tile_size, "stride": stride,
              "input_size": input_size}
    with tempfile.TemporaryDirectory(prefix="bench_ingestion_") as tmp:
        work = Path(tmp)
        source = limited_view(raw, limit, work / "raw") if limit else raw
        start = time.perf_counter()
        manifest, rejected = build_image_manifest(source, params)
        manifest_s = time.perf_counter() - start
        stream = tile_images(source, manifest, params)
        store = write_tile_store(work / "tiles", stream, stream.metadata,
                                 shard_size=params["shard_size"])
        total_s = time.perf_counter() - start
        store_mb = folder_mb(work / "tiles")
        n_tiles = len(store)
        shutil.rmtree(work / "tiles")
    n_images = len(manifest)
    return {
        "raw": str(raw) + (f" (first {limit} images)" if limit else ""),
        "images": n_images,
        "rejected": len(rejected),
        "tile_size": tile_size,
        "stride": stride,
        "input_size": input_size,
        "tiles_kept": n_tiles,
        "tiles_dropped": int(manifest["n_tiles_background"].sum()),
        "wall_s": round(total_s, 2),
        "manifest_s": round(manifest_s, 2),
        "tiling_s": round(total_s - manifest_s, 2),
        "images_per_s": round(n_images / total_s, 2),
        "tiles_per_s": round(n_tiles / total_s, 1),
        "store_mb": round(store_mb, 1),
        # ru_maxrss is in KiB on Linux (bytes on macOS)
        "peak_rss_mb": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            / (2**20 if sys.platform == "darwin" else 2**10), 1
        ),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", nargs="?", type=Path, default=DEFAULT_RAW,
                        help=f"raw images folder (default {DEFAULT_RAW})")
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--limit", type=int, default=None,
                        help="use only this many images, taken from the classes in turn")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not args.raw.is_dir():
        parser.error(f"raw folder '{args.raw}' does not exist")
    result = run(args.raw, args.tile_size, args.stride, args.input_size, args.limit)
    logger.info("done in %.1f s", result["wall_s"])
    print(json.dumps(result))  # the one machine-readable line on stdout
    return 0


if __name__ == "__main__":
    sys.exit(main())
