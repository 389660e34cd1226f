"""Training throughput: the project's training path against a plain Keras ``fit``, same run,
with what the CPU can do beside it.

Baseline = what the study did: tiles as a numpy array in memory, float32, Keras'
BatchNormalization, ``model.fit(x, y, batch_size=16)`` with SGD. Pipeline = ``train_model``'s
path as the defaults run it: tiles read from a tile store, the recipe's input (balanced
sampling, online augmentation, a fixed number of steps an epoch), ``fit_stage``, the ResNet34
as ``resnet34.model`` builds it (``batch_norm: fused``) and the precision ``precision: auto``
picks on this machine (``runtime/distribution.py``: mixed bfloat16 where the CPU multiplies
bfloat16 natively, float32 elsewhere). Both fit the same architecture from the same initial
weights with SGD; the first epoch (graph tracing) is left out; the baseline is timed before
and after the pipeline (its median over both), so a machine that slows down during the run
does not favour either side.

Also printed: the training FLOPs of one image (3 x the forward pass, from the layer shapes),
the GFLOP/s that each side achieves, and a 2048 x 2048 float32 (and bfloat16) matmul's GFLOP/s
measured in the same process: how far the network is from what the cores can do.

``--variants`` adds, each in a fresh process (thread pools and the Keras backend are fixed per
process): plain ``fit`` with other thread settings, XLA, mixed bfloat16, larger batches, and
Keras on the JAX and PyTorch backends where those are installed. Prints one JSON line.

    python benchmarks/bench_training.py --tiles 512 --size 64 --epochs 3
    python benchmarks/bench_training.py --size 128 --variants
    python benchmarks/bench_training.py --study-input   # the pipeline side on the study's input
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: name -> (environment, extra arguments) of the plain-fit variants run in their own process.
VARIANTS: dict[str, tuple[dict[str, str], list[str]]] = {
    "fit_float32_threads_2_2": ({}, ["--intra", "2", "--inter", "2"]),
    "fit_float32_threads_2_1": ({}, ["--intra", "2", "--inter", "1"]),
    "fit_float32_threads_1_1": ({}, ["--intra", "1", "--inter", "1"]),
    "fit_float32_onednn_off": ({"TF_ENABLE_ONEDNN_OPTS": "0"}, []),
    "fit_float32_xla": ({}, ["--jit"]),
    "fit_float32_fused_batchnorm": ({}, ["--batch-norm", "fused"]),
    "fit_mixed_bfloat16": ({}, ["--precision", "mixed_bfloat16"]),
    "fit_mixed_bfloat16_fused_batchnorm": ({}, ["--precision", "mixed_bfloat16",
                                                "--batch-norm", "fused"]),
    "fit_float32_batch_32": ({}, ["--batch-size", "32"]),
    "fit_float32_batch_64": ({}, ["--batch-size", "64"]),
    "fit_float32_jax": ({"KERAS_BACKEND": "jax"}, []),
    "fit_float32_torch": ({"KERAS_BACKEND": "torch"}, []),
}
BACKEND_PACKAGES = {"jax": "jax", "torch": "torch"}


def training_flops(model: Any) -> float:
    """FLOPs to train on one image: 2 per multiply-add of every convolution and dense layer,
    forward and twice that backward (input and weight gradients)."""
    import keras  # noqa: PLC0415  (lazy: the backend is chosen by the environment)

    macs = 0
    for layer in _leaves(model):
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw = layer.kernel_size
            macs += h * w * c_out * kh * kw * layer.input.shape[-1]
        elif isinstance(layer, keras.layers.Dense):
            macs += layer.input.shape[-1] * layer.units
    return 3 * 2 * float(macs)


def _leaves(model: Any) -> list[Any]:
    out = []
    for layer in model.layers:
        out.extend(_leaves(layer) if hasattr(layer, "layers") else [layer])
    return out


def matmul_gflops(dtype: str = "float32", n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of an n x n matmul in TensorFlow (median of ``repeats``, after a warm-up)."""
    import tensorflow as tf  # noqa: PLC0415

    a = tf.random.uniform((n, n), dtype=tf.float32)
    a = tf.cast(a, dtype)
    tf.matmul(a, a).numpy()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        tf.matmul(a, a).numpy()
        times.append(time.perf_counter() - started)
    return 2 * n**3 / statistics.median(times) / 1e9


def _data(args: argparse.Namespace) -> tuple[Any, Any]:
    import numpy as np  # noqa: PLC0415

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.tiles, args.size, args.size, 3), dtype=np.uint8)
    return x, np.arange(args.tiles) % args.classes


def _model(args: argparse.Namespace, batch_norm: str) -> Any:
    import keras  # noqa: PLC0415

    from neuroblastoma_cnn.models.families import build_model  # noqa: PLC0415

    keras.utils.set_random_seed(0)
    extra = {"batch_norm": batch_norm} if args.architecture == "resnet34" else {}
    return build_model(args.architecture, input_size=args.size, num_classes=args.classes, seed=0,
                       **extra)


def plain_fit(args: argparse.Namespace, x: Any, y: Any, model: Any = None) -> tuple[Any, list]:
    """``model.fit`` on the in-memory arrays (float32 unless ``--precision``); epoch times."""
    import keras  # noqa: PLC0415
    from timing import EpochTimer  # noqa: PLC0415

    if model is None:
        keras.config.set_dtype_policy(args.precision)
        model = _model(args, args.batch_norm)
        keras.config.set_dtype_policy("float32")
        model.compile(optimizer=keras.optimizers.SGD(0.01),
                      loss="sparse_categorical_crossentropy", jit_compile=args.jit)
    timer = EpochTimer()
    model.fit(x.astype("float32"), y, batch_size=args.batch_size, epochs=args.epochs,
              callbacks=[timer], verbose=0)
    return model, timer.times


def pipeline_fit(args: argparse.Namespace, store: Any, x: Any,
                 y: Any) -> tuple[Any, list, str, str]:
    """``fit_stage`` on the tile store, as ``train_model`` runs it with the defaults: the recipe
    input (or ``--study-input``) and the precision ``auto`` picks here."""
    import keras  # noqa: PLC0415
    from timing import EpochTimer  # noqa: PLC0415

    from neuroblastoma_cnn.images.tf_input import make_tf_dataset  # noqa: PLC0415
    from neuroblastoma_cnn.params import TrainingParams, base_group  # noqa: PLC0415
    from neuroblastoma_cnn.pipelines.training import nodes  # noqa: PLC0415
    from neuroblastoma_cnn.runtime import distribution  # noqa: PLC0415

    training = TrainingParams.parse(base_group("resnet34.training", seed=0,
                                               batch_size=args.batch_size), "resnet34.training")
    batch_norm = base_group("resnet34.model")["batch_norm"]
    chosen = distribution.current_plan(training.distribution, training.precision,
                                       training.jit_compile)
    previous = distribution.precision_policy(chosen)
    try:
        model = _model(args, batch_norm)
    finally:
        keras.config.set_dtype_policy(previous)
    ids = store.index["tile_id"].tolist()
    if args.study_input:
        train, steps = make_tf_dataset(store, ids, y, args.batch_size, shuffle=True, seed=0,
                                       in_memory_limit_mb=2048), None
    else:
        train = nodes.training_stream(store, ids, y, args.batch_size, training)
        steps = -(-args.tiles // args.batch_size)
    timer = EpochTimer()
    original_fit = model.fit

    def fit_with_timer(*a: Any, **kw: Any) -> Any:  # adds the timer without changing fit_stage
        kw["callbacks"] = [timer, *kw.get("callbacks", [])]
        return original_fit(*a, **kw)

    model.fit = fit_with_timer
    nodes.fit_stage(model, train, x[: args.batch_size].astype("float32"), y[: args.batch_size],
                    epochs=args.epochs, optimizer=keras.optimizers.SGD(0.01),
                    num_classes=args.classes, monitor="val_macro_f1", patience=None,
                    class_weight=None, stage="bench", history=[], steps_per_epoch=steps,
                    jit_compile=chosen.jit_compile)
    return model, timer.times, chosen.precision, batch_norm


def rate(args: argparse.Namespace, *runs: list[float]) -> float:
    """Images per second: the median steady epoch (each run's first epoch traces)."""
    steady = [t for times in runs for t in (times[1:] or times)]
    return args.tiles / statistics.median(steady)


def variant(args: argparse.Namespace) -> dict[str, Any]:
    """One plain-fit variant in this process (thread pools set before anything runs)."""
    import keras  # noqa: PLC0415

    if keras.backend.backend() == "tensorflow" and (args.intra or args.inter):
        import tensorflow as tf  # noqa: PLC0415

        tf.config.threading.set_intra_op_parallelism_threads(args.intra or 0)
        tf.config.threading.set_inter_op_parallelism_threads(args.inter or 0)
    x, y = _data(args)
    _, times = plain_fit(args, x, y)
    return {"images_per_s": round(rate(args, times), 2), "backend": keras.backend.backend()}


def run_variants(args: argparse.Namespace) -> dict[str, Any]:
    """Every variant in its own process; one that cannot run says why in one line."""
    import importlib.util  # noqa: PLC0415

    common = ["--tiles", str(args.tiles), "--size", str(args.size), "--epochs",
              str(args.epochs), "--architecture", args.architecture]
    out: dict[str, Any] = {}
    for name, (env, extra) in VARIANTS.items():
        backend = env.get("KERAS_BACKEND")
        if backend and importlib.util.find_spec(BACKEND_PACKAGES[backend]) is None:
            out[name] = f"not installed: pip install {BACKEND_PACKAGES[backend]}"
            continue
        batch = [] if "--batch-size" in extra else ["--batch-size", str(args.batch_size)]
        result = subprocess.run(
            [sys.executable, __file__, "--variant", *common, *extra, *batch],
            env={**os.environ, **env}, capture_output=True, text=True, check=False,
            timeout=3600)
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        out[name] = (json.loads(lines[-1])["images_per_s"] if result.returncode == 0 and lines
                     else f"failed: {(result.stderr.strip().splitlines() or ['?'])[-1][:200]}")
    return out


def machine() -> dict[str, Any]:
    from neuroblastoma_cnn.runtime.distribution import cpu_bf16  # noqa: PLC0415

    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?") if Path("/proc/cpuinfo").exists() \
        else "?"
    return {"cpu": model, "cpus": len(os.sched_getaffinity(0)), "native_bf16": cpu_bf16()}


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=512)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--architecture", default="resnet34")
    parser.add_argument("--study-input", action="store_true",
                        help="pipeline side on the study's input (one shuffled pass an epoch)")
    parser.add_argument("--variants", action="store_true",
                        help="also time plain-fit variants, each in its own process")
    parser.add_argument("--variant", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--jit", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch-norm", default="keras", help=argparse.SUPPRESS)
    parser.add_argument("--intra", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--inter", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse()
    logging.basicConfig(level=logging.WARNING)
    if args.variant:
        print(json.dumps(variant(args)))
        return

    from neuroblastoma_cnn.datasets import write_tile_store  # noqa: PLC0415

    x, y = _data(args)
    names = [f"class{i}" for i in range(args.classes)]
    store = write_tile_store(
        Path(tempfile.mkdtemp()) / "train",
        ((t, {"label": names[c]}) for t, c in zip(x, y, strict=True)), {"classes": names})
    matmul = {dtype: round(matmul_gflops(dtype), 1) for dtype in ("float32", "bfloat16")}
    baseline, before = plain_fit(args, x, y)
    _, pipe_times, precision, batch_norm = pipeline_fit(args, store, x, y)
    _, after = plain_fit(args, x, y, model=baseline)
    flops = training_flops(baseline)
    base_rate, pipe_rate = rate(args, before, after), rate(args, pipe_times)
    result = {
        **machine(),
        "architecture": args.architecture, "tiles": args.tiles, "input_size": args.size,
        "epochs": args.epochs, "batch_size": args.batch_size,
        "pipeline_input": "study" if args.study_input else "recipe",
        "pipeline_precision": precision, "pipeline_batch_norm": batch_norm,
        "baseline_images_per_s": round(base_rate, 2),
        "pipeline_images_per_s": round(pipe_rate, 2),
        "ratio": round(pipe_rate / base_rate, 3),
        "train_gflop_per_image": round(flops / 1e9, 3),
        "baseline_gflops": round(base_rate * flops / 1e9, 1),
        "pipeline_gflops": round(pipe_rate * flops / 1e9, 1),
        "matmul_float32_gflops": matmul["float32"],
        "matmul_bfloat16_gflops": matmul["bfloat16"],
        "pipeline_share_of_float32_matmul": round(pipe_rate * flops / 1e9 / matmul["float32"],
                                                  3),
        "baseline_epoch_s": [round(t, 2) for t in before + after],
        "pipeline_epoch_s": [round(t, 2) for t in pipe_times],
    }
    if args.variants:
        result["variants_images_per_s"] = run_variants(args)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
