"""Stage-1 ResNet50 training: feature cache vs the naive frozen fit.

Both train the same head on the same random images (weights=None: the timing does not depend on
the weight values). The naive fit runs the frozen backbone on every image at every epoch; the
cache runs it once. Per-epoch times are measured for both; the projection to ``--target-epochs``
is first epoch + (target - 1) x median later epoch, plus, for the cache, its measured one-off cost
(model split, feature extraction, compile).

    .venv/bin/python benchmarks/bench_feature_cache.py --n 64 --size 96 --epochs 5

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import keras
import numpy as np
from timing import EpochTimer

from neuroblastoma_cnn.models.resnet50 import build_resnet50, cache_features


def project(epoch_times: list[float], target: int, one_off: float = 0.0) -> float:
    """Time of ``target`` epochs from measured ones: first epoch, then the median later epoch."""
    later = statistics.median(epoch_times[1:]) if len(epoch_times) > 1 else epoch_times[0]
    return one_off + epoch_times[0] + (target - 1) * later


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="number of training images")
    parser.add_argument("--size", type=int, default=96, help="input size in pixels")
    parser.add_argument("--epochs", type=int, default=5, help="epochs actually run")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--target-epochs", type=int, default=50, help="epochs to project to")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    x = rng.integers(0, 256, (args.n, args.size, args.size, 3), dtype=np.uint8)
    y = rng.integers(0, args.classes, args.n)
    model = build_resnet50(args.size, args.classes, weights=None, seed=args.seed)
    initial = model.get_weights()

    naive_timer = EpochTimer()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    started = time.perf_counter()
    model.fit(x, y, batch_size=args.batch, epochs=args.epochs, shuffle=True, verbose=0,
              callbacks=[naive_timer])
    naive_total = time.perf_counter() - started

    model.set_weights(initial)
    cached_timer = EpochTimer()
    started = time.perf_counter()
    cached = cache_features(model, x, y, batch_size=args.batch, seed=args.seed)
    cached.head.compile(optimizer=keras.optimizers.Adam(1e-3),
                        loss="sparse_categorical_crossentropy")
    cached.head.fit(cached.train, epochs=args.epochs, callbacks=[cached_timer], verbose=0)
    cached_total = time.perf_counter() - started
    cache_cost = cached_total - sum(cached_timer.times)

    target = args.target_epochs
    naive_target = project(naive_timer.times, target)
    cached_target = project(cached_timer.times, target, one_off=cache_cost)
    result = {
        "benchmark": "resnet50_stage1_feature_cache",
        "n_images": args.n, "input_size": args.size, "batch_size": args.batch,
        "epochs_run": args.epochs,
        "naive_total_s": round(naive_total, 3),
        "naive_epoch_s": [round(t, 3) for t in naive_timer.times],
        "cached_total_s": round(cached_total, 3),
        "cache_one_off_s": round(cache_cost, 3),
        "cached_epoch_s": [round(t, 4) for t in cached_timer.times],
        "speedup_measured": round(naive_total / cached_total, 2),
        "target_epochs": target,
        "naive_projected_s": round(naive_target, 2),
        "cached_projected_s": round(cached_target, 2),
        "speedup_projected": round(naive_target / cached_target, 2),
        "projection": "first epoch + (target-1) x median later epoch (+ cache one-off cost)",
        "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "keras": keras.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
