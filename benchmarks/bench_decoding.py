"""Full vs reduced decoding on real images: tissue agreement, tile differences, time per image.

Why: ``ingestion.decoding: reduced`` decodes images at 1/r scale and applies the tissue rule
there. It may become the default only if it keeps (nearly) the same tiles as the full-resolution
rule and gives tiles close to the full method's. Measured here, on the same files, in one run:

- agreement: tiles kept by both rules / tiles kept by either (and per rule: kept by the other);
- pixels: for tiles kept by both, the difference between the full method's tile (native decode,
  tissue rule, bilinear resize) and the reduced one (mean absolute, 99th percentile, max,
  PSNR), in grey levels of 0..255;
- time: decode + tissue rule + tiles per image, one thread, best of ``--repeats``.

    .venv/bin/python benchmarks/bench_decoding.py [--images DIR] [--limit N]
        [--tile-size 512] [--input-size 128]

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from neuroblastoma_cnn.params import IngestionParams, base_group
from neuroblastoma_cnn.pipelines.predict.nodes import list_image_files

ROOT = Path(__file__).resolve().parents[1]


def settings(tile_size: int, input_size: int, decoding: str) -> IngestionParams:
    raw = base_group("ingestion", tile_size=tile_size, stride=tile_size, input_size=input_size,
                     decoding=decoding)
    return IngestionParams.parse(raw, "ingestion")


def tiles_of(data: bytes, name: str, params: IngestionParams) -> tuple[dict, list, float]:
    """``({(x, y): tile}, scores, seconds)`` of one file as ingestion cuts it."""
    started = time.perf_counter()
    decoded = params.image_checks.decode_for(data, name, params.tiling)
    tiles = {(t.x, t.y): t.tile for t in params.tiling.tile(decoded)}
    seconds = time.perf_counter() - started
    return tiles, params.tiling.score(decoded), seconds


def compare(files: list, full: IngestionParams, reduced: IngestionParams,
            repeats: int) -> dict:
    both = only_full = only_reduced = grid = 0
    diffs: list[np.ndarray] = []
    seconds = {"full": 0.0, "reduced": 0.0}
    fraction_error: list[float] = []
    for name, path in files:
        data = path.read_bytes()
        best = {}
        for label, params in (("full", full), ("reduced", reduced)):
            runs = [tiles_of(data, name, params) for _ in range(repeats)]
            best[label] = runs[0][:2]
            seconds[label] += min(r[2] for r in runs)
        (full_tiles, full_scores), (red_tiles, red_scores) = best["full"], best["reduced"]
        grid += len(full_scores)
        fraction_error += [abs(a[2] - b[2]) for a, b in zip(full_scores, red_scores, strict=True)]
        keys_f, keys_r = set(full_tiles), set(red_tiles)
        both += len(keys_f & keys_r)
        only_full += len(keys_f - keys_r)
        only_reduced += len(keys_r - keys_f)
        for key in sorted(keys_f & keys_r):
            diffs.append(np.abs(full_tiles[key].astype(np.int16) - red_tiles[key]).ravel())
    delta = np.concatenate(diffs) if diffs else np.zeros(1)
    mse = float(np.mean(delta.astype(np.float64) ** 2))
    kept_full, kept_red = both + only_full, both + only_reduced
    return {
        "grid_tiles": grid,
        "kept_full": kept_full,
        "kept_reduced": kept_red,
        "kept_both": both,
        "agreement (both / either)": round(both / max(1, both + only_full + only_reduced), 4),
        "full kept also kept by reduced": round(both / max(1, kept_full), 4),
        "reduced kept also kept by full": round(both / max(1, kept_red), 4),
        "tissue_fraction abs error mean, max": [round(float(np.mean(fraction_error)), 4),
                                                round(float(np.max(fraction_error)), 4)],
        "tile pixel diff mean": round(float(delta.mean()), 2),
        "tile pixel diff p99": float(np.percentile(delta, 99)),
        "tile pixel diff max": int(delta.max()),
        "tile PSNR dB": round(10 * np.log10(255**2 / mse), 1) if mse else None,
        "ms per image full (decode+tiles, 1 thread)": round(1000 * seconds["full"] / len(files), 1),
        "ms per image reduced": round(1000 * seconds["reduced"] / len(files), 1),
        "speed-up reduced vs full": round(seconds["full"] / seconds["reduced"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared/data/bach/images")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    files = list_image_files(args.images)[: args.limit]
    full = settings(args.tile_size, args.input_size, "full")
    reduced = settings(args.tile_size, args.input_size, "reduced")
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average at start "
                   f"{load:.1f}",
        "images": len(files), "tile_size": args.tile_size, "input_size": args.input_size,
        "reduction": reduced.tiling.reduction(2048, 1536),
        **compare(files, full, reduced, args.repeats),
    }
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
