"""Prediction throughput: the predict pipeline's function vs bare Keras on the same tiles.

An untrained ResNet34 at ``--input-size`` px with a preprocessing record (tiles ``--tile-size``,
stride = tile size, the base ingestion parameters otherwise) is saved and loaded the way the
pipeline loads models: weights do not change the cost of a forward pass, so nothing is trained.

Measured in one process, on the same files and the same model:

1. ``decode`` / ``tiling``: the preprocessing alone, single-threaded (the breakdown); its tiles
   are kept in memory for the baselines.
2. ``pipeline``: ``predict_files`` (decode + tissue tiling + resize on worker threads, batched
   inference, aggregation), excluding start-up (imports, model load, first-call tracing).
3. ``bare model.predict``: one ``model.predict`` over all preloaded tiles (float32).
4. ``bare predict_on_batch``: the inference call the pipeline makes, on preloaded batches.

2 to 4 run in ``--repeats`` interleaved rounds; the best round of each is the headline (on a
shared machine, other processes only ever slow a round down) and the median is shown beside it.

Then the command's start-up: ``neuroblastoma-cnn --help`` and the time to the first prediction
(one image, fresh process), with ``import tensorflow`` alone for reference.

    .venv/bin/python benchmarks/bench_predict.py [--images DIR] [--limit 60]

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from neuroblastoma_cnn.datasets import TrainedModels, save_keras_model  # noqa: E402
from neuroblastoma_cnn.models import build_model  # noqa: E402
from neuroblastoma_cnn.params import PredictParams, base_group  # noqa: E402
from neuroblastoma_cnn.pipelines.predict.nodes import (  # noqa: E402
    decode_for_prediction,
    gradcam_overlays,
    list_image_files,
    predict_files,
    select_tiles,
)
from neuroblastoma_cnn.preprocessing import preprocessing_of  # noqa: E402

CLI = Path(sys.executable).with_name("neuroblastoma-cnn")


def make_model(folder: Path, input_size: int, tile_size: int, classes: list[str]) -> Path:
    """Saves an untrained ResNet34 with the record training would give it; returns its path."""
    params = yaml.safe_load((ROOT / "conf/base/parameters_ingestion.yml").read_text())["ingestion"]
    params.update(tile_size=tile_size, stride=tile_size, input_size=input_size)
    model = build_model("resnet34", input_size, len(classes), seed=0)
    model.preprocessing = {
        "classes": classes, "input_size": input_size, "tile_size": tile_size,
        "stride": tile_size, "min_tissue_fraction": params["min_tissue_fraction"],
        "ingestion": params, "architecture": "resnet34",
    }
    path = folder / "resnet34_untrained.keras"
    save_keras_model(model, path)
    return path


def timed(seconds: list[float], command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, check=False)
    seconds.append(time.perf_counter() - started)
    if result.returncode not in (0, 1):
        raise RuntimeError(f"{command} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared/data/bach/images")
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--gradcam", type=int, default=10,
                        help="also time Grad-CAM overlays of this many images (0: skip)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved rounds of pipeline and baselines (best is reported)")
    parser.add_argument("--startup-repeats", type=int, default=3)
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    files = list_image_files(args.images)[: args.limit]
    classes = sorted(p.name for p in args.images.iterdir() if p.is_dir()) or ["a", "b"]
    tmp = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    model_path = make_model(tmp, args.input_size, args.tile_size, classes)
    started = time.perf_counter()
    model = TrainedModels(tmp).load(str(model_path))
    load_s = time.perf_counter() - started
    settings = {"batch_size": args.batch_size, "workers": args.workers, "gradcam": False}
    params = PredictParams.parse(base_group("predict", **settings), "predict")
    warm = np.zeros((args.batch_size, args.input_size, args.input_size, 3), np.float32)
    model.predict_on_batch(warm)  # tracing: start-up, not throughput
    model.predict(warm, batch_size=args.batch_size, verbose=0)

    decode_s, tiling_s, tiles = _breakdown(files, model)
    seconds, predictions, tile_table = _rounds(files, model, params, tiles, args)
    n_images, n_tiles = int((~predictions["rejected"]).sum()), len(tile_table)
    gradcam_s = _gradcam_seconds(files, model, predictions, params, args.gradcam)
    help_s, first_s, import_s = _startup(files, model_path, tmp, args.startup_repeats)
    _report(args, load_at_start, seconds, n_images, n_tiles, predictions, decode_s, tiling_s,
            len(files), gradcam_s, load_s, help_s, first_s, import_s)


def _breakdown(files: list, model) -> tuple[float, float, np.ndarray]:
    """Decode and tiling alone, one thread; the tiles are kept for the baselines."""
    preprocessing = preprocessing_of(model)
    decode_s = tiling_s = 0.0
    chunks = []
    for name, path in files:
        t0 = time.perf_counter()
        rgb = decode_for_prediction(path, name, preprocessing)
        t1 = time.perf_counter()
        chunks.append(select_tiles(rgb, preprocessing.tiling, 3)[0])
        tiling_s += time.perf_counter() - t1
        decode_s += t1 - t0
    return decode_s, tiling_s, np.concatenate(chunks).astype(np.float32)


def _rounds(files: list, model, params, tiles: np.ndarray, args) -> tuple:
    """Rounds, interleaved so that a busy spell of a shared machine hits every contender:
    1. the pipeline's function from files; 2. model.predict and 3. predict_on_batch on the
    preloaded tiles. Best and median of the rounds are reported."""
    seconds: dict[str, list[float]] = {"pipeline": [], "bare model.predict": [],
                                       "bare predict_on_batch": []}
    for _ in range(args.repeats):
        started = time.perf_counter()
        predictions, tile_table = predict_files(files, model, params)
        seconds["pipeline"].append(time.perf_counter() - started)
        started = time.perf_counter()
        bare = model.predict(tiles, batch_size=args.batch_size, verbose=0)
        seconds["bare model.predict"].append(time.perf_counter() - started)
        started = time.perf_counter()
        for i in range(0, len(tiles), args.batch_size):
            model.predict_on_batch(tiles[i : i + args.batch_size])
        seconds["bare predict_on_batch"].append(time.perf_counter() - started)
    assert len(tiles) == len(tile_table), (len(tiles), len(tile_table))
    np.testing.assert_allclose(bare, tile_table.filter(like="prob_").to_numpy(), atol=1e-4)
    return seconds, predictions, tile_table


def _gradcam_seconds(files: list, model, predictions, params, n: int) -> float | None:
    gradcam_s = None
    if n:
        subset = files[:n]
        jobs = gradcam_overlays(subset, model, predictions.head(len(subset)),
                                params.model_copy(update={"gradcam": True}))
        next(iter(jobs.values()))()  # tracing
        started = time.perf_counter()
        for draw in jobs.values():
            draw()
        gradcam_s = (time.perf_counter() - started) / len(jobs)
    return gradcam_s


def _startup(files: list, model_path: Path, tmp: Path, repeats: int) -> tuple:
    """The command: --help, and a fresh process to its first prediction."""
    help_s: list[float] = []
    first_s: list[float] = []
    import_s: list[float] = []
    for _ in range(repeats):
        timed(help_s, [str(CLI), "--help"], tmp)
        timed(import_s, [sys.executable, "-c", "import tensorflow"], tmp)
        out = tmp / "one.csv"
        out.unlink(missing_ok=True)
        timed(first_s, [str(CLI), "predict", str(files[0][1]), "--model", str(model_path),
                        "--out", str(out), "-q"], tmp)
    return help_s, first_s, import_s


def _report(args, load_at_start, seconds, n_images, n_tiles, predictions, decode_s, tiling_s,
            n_files, gradcam_s, load_s, help_s, first_s, import_s) -> None:
    best = {k: n_tiles / min(v) for k, v in seconds.items()}
    median = {k: n_tiles / statistics.median(v) for k, v in seconds.items()}
    pipeline_s = min(seconds["pipeline"])
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"load average at start {load_at_start:.1f}",
        "images": n_images, "tiles": n_tiles, "rejected": int(predictions["rejected"].sum()),
        "input_size": args.input_size, "tile_size": args.tile_size,
        "batch_size": args.batch_size, "workers": args.workers, "repeats": args.repeats,
        "pipeline_s": round(pipeline_s, 2),
        "pipeline_images_per_s": round(n_images / pipeline_s, 2),
        **{f"{k} tiles/s (best, median)": f"{best[k]:.1f}, {median[k]:.1f}" for k in seconds},
        "ratio_vs_model_predict (best, median)":
            f"{best['pipeline'] / best['bare model.predict']:.3f}, "
            f"{median['pipeline'] / median['bare model.predict']:.3f}",
        "ratio_vs_predict_on_batch (best, median)":
            f"{best['pipeline'] / best['bare predict_on_batch']:.3f}, "
            f"{median['pipeline'] / median['bare predict_on_batch']:.3f}",
        "decode_ms_per_image (1 thread)": round(1000 * decode_s / n_files, 1),
        "tiling_ms_per_image (1 thread)": round(1000 * tiling_s / n_files, 1),
        "inference_ms_per_image (best predict_on_batch)":
            round(1000 * min(seconds["bare predict_on_batch"]) / n_images, 1),
        "gradcam_s_per_image": None if gradcam_s is None else round(gradcam_s, 3),
        "model_load_s": round(load_s, 2),
        "cli_help_s (median)": round(statistics.median(help_s), 2),
        "cli_first_prediction_s (median)": round(statistics.median(first_s), 2),
        "import_tensorflow_s (median)": round(statistics.median(import_s), 2),
    }
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
