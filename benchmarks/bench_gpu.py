# On a GPU machine without TensorFlow (JAX + CUDA there; keras, namex, optree wheels in .whl/),
# from the repository root:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site KERAS_BACKEND=jax \
#     XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 && nvidia-smi -L && \
#     python3 benchmarks/bench_gpu.py --out $OUT/gpu.json --batch 256 --size 224 \
#     --warmup 3 --steps 30 --max-seconds 240
#
# Locally (TensorFlow backend, tiny, about a minute on a CPU):
#
#   python benchmarks/bench_gpu.py --size 32 --batch 8 --steps 2 --out /tmp/g.json
"""Training throughput of the project's ResNet34 in float32 and mixed precision, against a plain
Keras ResNet50, on whatever Keras backend is set (JAX where a GPU machine has no TensorFlow).

The figures say what a GPU buys the from-scratch recipe and whether mixed precision is worth
switching on, with ``keras.applications.ResNet50`` timed in the same run as a yardstick that
does not depend on this project's code. Data are synthetic images kept on the device, so the
step time is the model's alone (no input pipeline, no host-to-device copies).

Prints one JSON line per configuration and writes them all to ``--out`` (rewritten after each
configuration, so a run cut short still leaves what it measured).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import logging
import os
import statistics
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

LOG = logging.getLogger("bench_gpu")
MODELS_DIR = Path(__file__).resolve().parents[1] / "src" / "neuroblastoma_cnn" / "models"
NUM_CLASSES = 5
# Most telling first (a run stopped by --max-seconds loses the least): float16 last, as bfloat16
# is what recent GPUs train in without loss scaling.
DEFAULT_CONFIGS = (
    "resnet34:float32,resnet34:mixed_bfloat16,resnet50:float32,resnet50:mixed_bfloat16,"
    "resnet34:mixed_float16"
)


def load_resnet34() -> types.ModuleType:
    """``resnet34.py`` loaded by file path, with ``head.py`` as the module it imports.

    Why not ``import neuroblastoma_cnn.models.resnet34``: on the GPU machine the package is not
    installed, and its ``models/__init__.py`` imports ``resnet50.py``, which needs TensorFlow
    (absent there). So minimal stub parents are registered in ``sys.modules`` (they run no
    ``__init__``) and ``head.py`` is registered under its real name first, so resnet34's
    ``from neuroblastoma_cnn.models.head import ...`` resolves to it.
    """
    for name in ("neuroblastoma_cnn", "neuroblastoma_cnn.models"):
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.__path__ = []  # a package, so submodule imports look in sys.modules
            sys.modules[name] = stub
    module = None
    for short in ("head", "resnet34"):
        full = f"neuroblastoma_cnn.models.{short}"
        spec = importlib.util.spec_from_file_location(full, MODELS_DIR / f"{short}.py")
        if spec is None or spec.loader is None:
            raise ImportError(f"Cannot load {MODELS_DIR / f'{short}.py'}.")
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
    assert module is not None
    return module


def _jax_device() -> str:
    jax = importlib.import_module("jax")
    dev = jax.devices()[0]
    return f"{dev.platform}:{getattr(dev, 'device_kind', dev)} (x{jax.device_count()})"


def _tf_device() -> str:
    tf = importlib.import_module("tensorflow")
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "cpu"
    details = tf.config.experimental.get_device_details(gpus[0])
    return f"gpu:{details.get('device_name', gpus[0].name)} (x{len(gpus)})"


def _torch_device() -> str:
    torch = importlib.import_module("torch")
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})"


def device_name() -> str:
    """The accelerator the backend trains on (first device), in words; imports only the
    backend's own framework (the GPU machine has no TensorFlow)."""
    probe = {"jax": _jax_device, "tensorflow": _tf_device, "torch": _torch_device}.get(
        keras.backend.backend())
    try:
        return probe() if probe else "unknown"
    except Exception as exc:  # the name is a label: never fail the benchmark over it
        return f"unknown ({exc})"


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Global dtype policy ``name`` while a model is built and trained, the previous one after,
    so one configuration's precision cannot leak into the next."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def build(model_name: str, size: int, resnet34: types.ModuleType) -> keras.Model:
    """The project's ResNet34 (recipe defaults: no dropout, no penalties) or the plain Keras
    ResNet50 baseline, both 5-way softmax classifiers from scratch."""
    if model_name == "resnet34":
        return resnet34.build_resnet34(input_size=size, num_classes=NUM_CLASSES, seed=0)
    if model_name == "resnet50":
        return keras.applications.ResNet50(weights=None, classes=NUM_CLASSES,
                                           input_shape=(size, size, 3))
    raise ValueError(f"Unknown model '{model_name}' (resnet34 or resnet50).")


def run_config(model_name: str, precision: str, args: argparse.Namespace,
               x: Any, y: Any, resnet34: types.ModuleType) -> dict[str, Any]:
    """Builds, compiles and times one (model, precision): ``args.warmup`` untimed steps (the
    first compiles), then ``args.steps`` timed ``train_on_batch`` calls on device-resident data.

    Each call returns the loss to the host, which waits for the step: per-step wall times are
    honest, at the price of no overlap between steps (small next to a 224 px batch's compute).
    """
    backend = keras.backend.backend()
    jit = True if backend == "jax" else bool(args.jit)  # Keras on JAX always jits the step
    with dtype_policy(precision):
        t0 = time.perf_counter()
        model = build(model_name, args.size, resnet34)
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01),
                      loss="sparse_categorical_crossentropy", jit_compile=jit)
        build_s = time.perf_counter() - t0
        output_dtype = str(model.outputs[0].dtype)
        if output_dtype != "float32":
            LOG.warning("%s under %s: the classifier outputs %s, not float32 (its head does not "
                        "force a float32 softmax); the loss itself is computed in float32.",
                        model_name, precision, output_dtype)
        t0 = time.perf_counter()
        losses = [float(model.train_on_batch(x, y)) for _ in range(args.warmup)]
        warmup_s = time.perf_counter() - t0
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            losses.append(float(model.train_on_batch(x, y)))
            times.append(time.perf_counter() - t0)
    if precision == "mixed_float16" and losses[0] == losses[-1]:
        LOG.warning("%s mixed_float16: loss unchanged, so dynamic loss scaling skipped every "
                    "update (its scale starts high); the steps still ran forward and backward.",
                    model_name)
    median = statistics.median(times)
    record = {
        "model": model_name,
        "precision": precision,
        "batch": args.batch,
        "size": args.size,
        "images_per_s": round(args.batch / median, 1),
        "images_per_s_mean": round(args.batch * len(times) / sum(times), 1),
        "step_ms": round(median * 1000, 2),
        "step_ms_min": round(min(times) * 1000, 2),
        "step_ms_max": round(max(times) * 1000, 2),
        "timed_steps": len(times),
        "warmup_steps": args.warmup,
        "warmup_s": round(warmup_s, 1),
        "build_s": round(build_s, 1),
        "jit": jit,
        "output_dtype": output_dtype,
        "params": int(model.count_params()),
        "loss_first": round(losses[0], 4) if losses else None,
        "loss_last": round(losses[-1], 4) if losses else None,
        "backend": backend,
        "keras": keras.__version__,
        "device": args.device,
    }
    del model
    keras.backend.clear_session()
    gc.collect()
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps first (the first one compiles the step)")
    parser.add_argument("--jit", action="store_true",
                        help="XLA-compile the train step on TensorFlow (JAX always compiles)")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help="comma-separated model:precision pairs, run in this order")
    parser.add_argument("--max-seconds", type=float, default=0.0,
                        help="start no further configuration past this many seconds (0: none), "
                        "so a run under a device-time limit ends with what it finished")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for all results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1 (the first step compiles).")
    configs = [tuple(c.strip().split(":", 1)) for c in args.configs.split(",") if c.strip()]

    start = time.perf_counter()
    resnet34 = load_resnet34()
    args.device = device_name()
    LOG.info("Keras %s, backend %s, device %s", keras.__version__, keras.backend.backend(),
             args.device)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    labels = (np.arange(args.batch) % NUM_CLASSES).astype("int32")
    # Sent to the device once, as uint8, and made float32 [0, 255] there: tiles as the
    # pipeline feeds them (ResNet34 rescales inside; the ResNet50 baseline takes them as they are).
    x = keras.ops.cast(keras.ops.convert_to_tensor(images), "float32")
    y = keras.ops.convert_to_tensor(labels)
    del images

    results: list[dict[str, Any]] = []
    for model_name, precision in configs:
        if args.max_seconds and time.perf_counter() - start > args.max_seconds:
            LOG.warning("Past --max-seconds %.0f: skipping %s %s.", args.max_seconds,
                        model_name, precision)
            continue
        LOG.info("%s %s: batch %d, %d px, %d warm-up + %d timed steps", model_name, precision,
                 args.batch, args.size, args.warmup, args.steps)
        try:
            record = run_config(model_name, precision, args, x, y, resnet34)
        except Exception as exc:  # e.g. out of memory: keep the other configurations
            LOG.exception("%s %s failed", model_name, precision)
            record = {"model": model_name, "precision": precision, "batch": args.batch,
                      "size": args.size, "backend": keras.backend.backend(),
                      "device": args.device, "error": f"{type(exc).__name__}: {exc}"[:500]}
            keras.backend.clear_session()
            gc.collect()
        results.append(record)
        print(json.dumps(record), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    LOG.info("Done in %.0f s: %s", time.perf_counter() - start, args.out)


if __name__ == "__main__":
    main()
