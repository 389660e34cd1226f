"""Feature extraction vs bare ``model.predict`` on the same tiles; fit time of each head.

The features pipeline's extraction node (``extract_feature_table``: pooled penultimate features
through the ResNet50 feature cache's ``extract_features``, the network's softmax from its head,
the extractor's identity hash, the table) is timed against a bare ``model.predict`` of the
whole network on the same tile store, through the same ``make_tf_dataset`` input, alternating
the two ``--repeats`` times after one warm-up each; the goal is a throughput ratio (extraction /
predict) of at least 0.9. Then every head of ``conf/base/parameters_features.yml`` is fitted
(grouped-CV grid search + refit, calibration for the SVM) on the table's training tiles, or on
``--features`` (a saved feature table, e.g. a real one) when given, and its fit time reported.

Random tiles: the timing of a forward pass does not depend on pixel values (random weights,
``weights: null``), so nothing licensed is needed.

    .venv/bin/python benchmarks/bench_features.py --model resnet34 --n 512 --size 128

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import keras
import numpy as np
import pandas as pd

from neuroblastoma_cnn.datasets.tile_store import write_tile_store
from neuroblastoma_cnn.images.preprocessing import Preprocessing, attach_preprocessing
from neuroblastoma_cnn.images.tf_input import make_tf_dataset
from neuroblastoma_cnn.models.families import build_model
from neuroblastoma_cnn.params import IngestionParams, base_group
from neuroblastoma_cnn.pipelines.features.nodes import extract_feature_table, fit_heads
from neuroblastoma_cnn.pipelines.features.params import ExtractionParams, HeadsParams

CLASSES = ["A", "B", "C", "D"]


def random_store(folder: Path, n: int, size: int, seed: int) -> tuple[object, pd.DataFrame]:
    """A tile store of ``n`` random tiles (8 per image, 2 images per group) and its split table:
    every tile in train, groups dealt round-robin into 5 folds."""
    rng = np.random.default_rng(seed)
    ingestion = IngestionParams.parse(base_group("ingestion", input_size=size), "ingestion")
    record = Preprocessing(classes=CLASSES, image_checks=ingestion.image_checks,
                           tiling=ingestion.tiling, architecture=None).to_dict()
    rows = []
    for i in range(n):
        image, group = i // 8, i // 16
        label = CLASSES[group % len(CLASSES)]
        rows.append({"image_path": f"{label}/g{group:04d}/{image}.png", "label": label,
                     "group": f"g{group:04d}"})

    def records():
        for meta in rows:
            yield rng.integers(0, 256, (size, size, 3), dtype=np.uint8), meta

    store = write_tile_store(folder / "tiles", records(), metadata=record, shard_size=256)
    split = store.index[["tile_id", "image_path", "label", "group"]].copy()
    split["split"] = "train"
    groups = sorted(split["group"].unique())
    split["fold"] = split["group"].map({g: k % 5 for k, g in enumerate(groups)})
    return store, split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["resnet34", "resnet50"], default="resnet34")
    parser.add_argument("--n", type=int, default=512, help="tiles")
    parser.add_argument("--size", type=int, default=128, help="input size in pixels")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--features", type=Path, default=None,
                        help="a saved feature table (parquet) to time the heads on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
        store, split = random_store(Path(tmp), args.n, args.size, args.seed)
        extra = {"weights": None} if args.model == "resnet50" else {}
        model = build_model(args.model, input_size=args.size, num_classes=len(CLASSES),
                            seed=args.seed, **extra)
        record = Preprocessing.from_store(store).model_copy(update={"architecture": args.model})
        attach_preprocessing(model, record, where=f"random {args.model}")
        ids = split["tile_id"].tolist()
        extraction = ExtractionParams.parse(
            {**base_group("features.extraction"), "batch_size": args.batch, "splits": ["train"]},
            "features.extraction")

        def bare() -> None:
            data = make_tf_dataset(store, ids, None, args.batch,
                                   in_memory_limit_mb=extraction.in_memory_limit_mb)
            model.predict(data, verbose=0)

        def extract() -> pd.DataFrame:
            return extract_feature_table(model, store, split, extraction)

        bare()  # warm-up: traces the predict function
        table = extract()
        bare_s, extract_s = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            bare()
            bare_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            table = extract()
            extract_s.append(time.perf_counter() - started)

    if args.features is not None:
        table = pd.read_parquet(args.features)
        split = table[["tile_id", "image_path", "label", "group", "split", "fold"]]
    heads = HeadsParams.parse(base_group("features.heads"), "features.heads")
    started = time.perf_counter()
    bundles, cv_results = fit_heads(table, split, heads)
    heads_total = time.perf_counter() - started
    fit_rows = table["split"].isin(heads.fit_splits)

    bare_tps = args.n / statistics.median(bare_s)
    extract_tps = args.n / statistics.median(extract_s)
    result = {
        "benchmark": "features_extraction_and_heads",
        "model": args.model, "n_tiles": args.n, "input_size": args.size,
        "batch_size": args.batch, "repeats": args.repeats,
        "bare_predict_s": [round(t, 3) for t in bare_s],
        "extraction_s": [round(t, 3) for t in extract_s],
        "bare_tiles_per_s": round(bare_tps, 1),
        "extraction_tiles_per_s": round(extract_tps, 1),
        "throughput_ratio": round(extract_tps / bare_tps, 3),
        "goal_ratio": 0.9,
        "heads_on": str(args.features) if args.features else "random-tile features above",
        "heads_fit_tiles": int(fit_rows.sum()),
        "feature_dim": int(bundles[next(iter(bundles))]["feature_dim"]),
        "grid_points": cv_results.groupby("head").size().to_dict(),
        "head_fit_s": {name: round(b["fit_seconds"], 2) for name, b in bundles.items()},
        "heads_total_s": round(heads_total, 2),
        "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "keras": keras.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
