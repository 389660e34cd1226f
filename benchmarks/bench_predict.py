"""Prediction throughput: the predict pipeline's function vs bare Keras on the same tiles.

An untrained ResNet34 at ``--input-size`` px with a preprocessing record (tiles ``--tile-size``,
stride = tile size, the base ingestion parameters otherwise) is saved and loaded the way the
pipeline loads models: weights do not change the cost of a forward pass, so nothing is trained.
The same network is saved once per ``--decodings`` method (``full``: the records of models
trained before reduced decoding; ``reduced``), so both are measured in the same run.

Measured in one process, on the same files and the same model:

1. ``decode`` / ``tiling``: the preprocessing alone, single-threaded (the breakdown), per
   method; its tiles are kept in memory for the baselines.
2. ``pipeline <method>``: ``predict_files`` (decode + tissue tiling + resize on worker threads,
   batched inference, aggregation), excluding start-up (imports, model load, first-call tracing).
3. ``bare model.predict``: one ``model.predict`` over all preloaded tiles (float32) of the last
   method.
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
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402

from neuroblastoma_cnn.datasets import TrainedModels, save_keras_model  # noqa: E402
from neuroblastoma_cnn.images.preprocessing import Preprocessing, preprocessing_of  # noqa: E402
from neuroblastoma_cnn.models.families import build_model  # noqa: E402
from neuroblastoma_cnn.params import IngestionParams, PredictParams, base_group  # noqa: E402
from neuroblastoma_cnn.pipelines.predict.nodes import (  # noqa: E402
    decode_for_prediction,
    gradcam_overlays,
    list_image_files,
    predict_files,
    select_tiles,
)

CLI = Path(sys.executable).with_name("neuroblastoma-cnn")


def make_models(folder: Path, input_size: int, tile_size: int, classes: list[str],
                decodings: list[str]) -> dict[str, Path]:
    """Saves one untrained ResNet34 with the record training would give it, once per decoding
    method; returns ``{method: path}``."""
    model = build_model("resnet34", input_size, len(classes), seed=0)
    paths = {}
    for decoding in decodings:
        ingestion = IngestionParams.parse(base_group(
            "ingestion", tile_size=tile_size, stride=tile_size, input_size=input_size,
            decoding=decoding), "ingestion")
        model.preprocessing = Preprocessing(
            classes=classes, image_checks=ingestion.image_checks, tiling=ingestion.tiling,
            architecture="resnet34")
        paths[decoding] = folder / f"resnet34_untrained_{decoding}.keras"
        save_keras_model(model, paths[decoding])
    return paths


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
    parser.add_argument("--decodings", nargs="+", default=["full", "reduced"],
                        choices=["full", "reduced"])
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    files = list_image_files(args.images)[: args.limit]
    classes = sorted(p.name for p in args.images.iterdir() if p.is_dir()) or ["a", "b"]
    tmp = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    paths = make_models(tmp, args.input_size, args.tile_size, classes, args.decodings)
    started = time.perf_counter()
    models = {decoding: TrainedModels(tmp).load(str(path)) for decoding, path in paths.items()}
    load_s = (time.perf_counter() - started) / len(models)
    settings = {"batch_size": args.batch_size, "workers": args.workers, "gradcam": False}
    params = PredictParams.parse(base_group("predict", **settings), "predict")
    warm = np.zeros((args.batch_size, args.input_size, args.input_size, 3), np.float32)
    for model in models.values():
        model.predict_on_batch(warm)  # tracing: start-up, not throughput
        model.predict(warm, batch_size=args.batch_size, verbose=0)

    breakdown = {decoding: _breakdown(files, model) for decoding, model in models.items()}
    tiles = breakdown[args.decodings[-1]][2]
    seconds, cpu, tables = _rounds(files, models, params, tiles, args)
    predictions = tables[args.decodings[-1]][0]
    last = models[args.decodings[-1]]
    gradcam_s = _gradcam_seconds(files, last, predictions, params, args.gradcam)
    help_s, first_s, import_s = _startup(files, paths[args.decodings[-1]], tmp,
                                         args.startup_repeats)
    _report(args, load_at_start, seconds, cpu, tables, breakdown, len(files), gradcam_s, load_s,
            help_s, first_s, import_s)


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


def _rounds(files: list, models: dict, params, tiles: np.ndarray, args) -> tuple:
    """Rounds, interleaved so that a busy spell of a shared machine hits every contender:
    1. the pipeline's function from files, per decoding method; 2. model.predict and
    3. predict_on_batch on the preloaded tiles (of the last method). Best and median of the
    rounds are reported, in wall time and in CPU time of this process."""
    seconds: dict[str, list[float]] = {f"pipeline {d}": [] for d in models}
    seconds.update({"bare model.predict": [], "bare predict_on_batch": []})
    cpu: dict[str, list[float]] = {k: [] for k in seconds}
    tables: dict[str, tuple] = {}
    model = models[args.decodings[-1]]
    results: dict[str, Any] = {}

    def clock(name: str, work: Any) -> None:
        started, cpu_started = time.perf_counter(), time.process_time()
        results[name] = work()
        seconds[name].append(time.perf_counter() - started)
        cpu[name].append(time.process_time() - cpu_started)

    def bare_batches() -> None:
        for i in range(0, len(tiles), args.batch_size):
            model.predict_on_batch(tiles[i : i + args.batch_size])

    for _ in range(args.repeats):
        for decoding, each in models.items():
            clock(f"pipeline {decoding}", lambda each=each: predict_files(files, each, params))
            tables[decoding] = results[f"pipeline {decoding}"]
        clock("bare model.predict",
              lambda: model.predict(tiles, batch_size=args.batch_size, verbose=0))
        clock("bare predict_on_batch", bare_batches)
    tile_table = tables[args.decodings[-1]][1]
    assert len(tiles) == len(tile_table), (len(tiles), len(tile_table))
    np.testing.assert_allclose(results["bare model.predict"],
                               tile_table.filter(like="prob_").to_numpy(), atol=1e-4)
    return seconds, cpu, tables


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


def _report(args, load_at_start, seconds, cpu, tables, breakdown, n_files, gradcam_s, load_s,
            help_s, first_s, import_s) -> None:
    last = args.decodings[-1]
    predictions = tables[last][0]
    n_images = int((~predictions["rejected"]).sum())
    n_tiles = {k: len(tables[k.split()[-1]][1]) if k.startswith("pipeline")
               else len(tables[last][1]) for k in seconds}
    best = {k: n_tiles[k] / min(v) for k, v in seconds.items()}
    median = {k: n_tiles[k] / statistics.median(v) for k, v in seconds.items()}
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"load average at start {load_at_start:.1f}, at end {os.getloadavg()[0]:.1f}",
        "images": n_images,
        "tiles": {d: len(tables[d][1]) for d in args.decodings},
        "rejected": int(predictions["rejected"].sum()),
        "input_size": args.input_size, "tile_size": args.tile_size,
        "batch_size": args.batch_size, "workers": args.workers, "repeats": args.repeats,
        **{f"{k} tiles/s (best, median)": f"{best[k]:.1f}, {median[k]:.1f}" for k in seconds},
    }
    for decoding in args.decodings:
        key = f"pipeline {decoding}"
        result[f"ratio {decoding} vs model.predict (best, median)"] = (
            f"{best[key] / best['bare model.predict']:.3f}, "
            f"{median[key] / median['bare model.predict']:.3f}")
        result[f"ratio {decoding} vs predict_on_batch (best, median)"] = (
            f"{best[key] / best['bare predict_on_batch']:.3f}, "
            f"{median[key] / median['bare predict_on_batch']:.3f}")
        # CPU seconds per tile (all threads of the process): on a machine shared with other
        # jobs, the share of CPU work that is inference does not depend on their load.
        result[f"cpu ratio {decoding} vs model.predict (median)"] = round(
            (statistics.median(cpu["bare model.predict"]) / n_tiles["bare model.predict"])
            / (statistics.median(cpu[key]) / n_tiles[key]), 3)
        result[f"pipeline {decoding} images/s (best)"] = round(
            n_images / min(seconds[key]), 2)
        decode_s, tiling_s, _ = breakdown[decoding]
        result[f"{decoding}: decode, tiling ms per image (1 thread)"] = [
            round(1000 * decode_s / n_files, 1), round(1000 * tiling_s / n_files, 1)]
    result.update({
        "inference_ms_per_image (best predict_on_batch)":
            round(1000 * min(seconds["bare predict_on_batch"]) / n_images, 1),
        "gradcam_s_per_image": None if gradcam_s is None else round(gradcam_s, 3),
        "model_load_s": round(load_s, 2),
        "cli_help_s (median)": _median(help_s),
        "cli_first_prediction_s (median)": _median(first_s),
        "import_tensorflow_s (median)": _median(import_s),
    })
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(result))


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


if __name__ == "__main__":
    main()
