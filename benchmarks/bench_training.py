"""Training throughput: the pipeline's training step against a plain Keras baseline, same run.

Baseline = what the study did: tiles as a numpy array in memory, ``model.fit(x, y, batch_size=16)``.
Pipeline = ``train_model``'s path: tiles read from a tile store through ``make_tf_dataset``
(shuffle, batch, prefetch) and fitted by ``fit_stage`` (with its per-epoch validation pass
excluded here by giving it a one-batch validation set, so both sides time the same work).

Both fit the same architecture from the same initial weights; the first epoch (graph tracing)
is left out of the images/s figures. Prints one JSON line.

    python benchmarks/bench_training.py --tiles 512 --size 96 --epochs 3
    python benchmarks/bench_training.py --online-augmentation   # the recipe's input pipeline

``--online-augmentation``: the pipeline side is the recipe's training input instead (endless
balanced sampling, every online transform on at the strengths of parameters_training.yml, a
fixed number of steps per epoch as many as one pass), so the ratio shows what the augmentation
costs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from timing import EpochTimer

from neuroblastoma_cnn.datasets import write_tile_store
from neuroblastoma_cnn.images.tf_input import make_tf_dataset
from neuroblastoma_cnn.models.families import build_model
from neuroblastoma_cnn.params import TrainingParams, base_group
from neuroblastoma_cnn.pipelines.training import nodes


def pipeline_input(store: object, y: np.ndarray, args: argparse.Namespace
                   ) -> tuple[object, int | None]:
    """The training input train_model builds: the study's shuffled pass, or with
    ``--online-augmentation`` the recipe's endless stream (and its steps per epoch)."""
    ids = store.index["tile_id"].tolist()
    if not args.online_augmentation:
        return make_tf_dataset(store, ids, y, args.batch_size, shuffle=True, seed=0,
                               in_memory_limit_mb=2048), None
    training = base_group("resnet34.training", sampling="balanced", seed=0,
                          batch_size=args.batch_size)
    training["online_augmentation"] = {**training["online_augmentation"], "enabled": True}
    recipe = TrainingParams.parse(training, "resnet34.training")
    return (nodes.training_stream(store, ids, y, args.batch_size, recipe),
            -(-args.tiles // args.batch_size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=512)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--architecture", default="resnet34")
    parser.add_argument("--deterministic", action="store_true",
                        help="enable TF op determinism (global: applies to both sides), as "
                        "the pipeline's default `deterministic: true` does")
    parser.add_argument("--online-augmentation", action="store_true",
                        help="time the recipe's input: balanced sampling + online augmentation")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.deterministic:
        tf.config.experimental.enable_op_determinism()

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.tiles, args.size, args.size, 3), dtype=np.uint8)
    y = np.arange(args.tiles) % args.classes
    names = [f"class{i}" for i in range(args.classes)]
    tmp = Path(tempfile.mkdtemp())
    store = write_tile_store(
        tmp / "train", ((t, {"label": names[c]}) for t, c in zip(x, y, strict=True)),
        {"classes": names},
    )

    def fresh_model() -> keras.Model:
        keras.utils.set_random_seed(0)
        return build_model(args.architecture, input_size=args.size, num_classes=args.classes,
                           seed=0)

    # Baseline: numpy in memory, plain model.fit.
    baseline = fresh_model()
    baseline.compile(optimizer=keras.optimizers.SGD(0.01),
                     loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    timer = EpochTimer()
    baseline.fit(x.astype("float32"), y, batch_size=args.batch_size, epochs=args.epochs,
                 callbacks=[timer], verbose=0)
    base_times = timer.times

    # Pipeline: tile store -> tf.data -> fit_stage (the code train_model runs).
    model = fresh_model()
    train, steps = pipeline_input(store, y, args)
    history: list[dict] = []
    timer = EpochTimer()
    val_x = x[: args.batch_size].astype("float32")
    original_fit = model.fit

    def fit_with_timer(*a, **kw):  # adds the timer without changing fit_stage
        kw["callbacks"] = [timer, *kw.get("callbacks", [])]
        return original_fit(*a, **kw)

    model.fit = fit_with_timer
    nodes.fit_stage(model, train, val_x, y[: args.batch_size], epochs=args.epochs,
                    optimizer=keras.optimizers.SGD(0.01), num_classes=args.classes,
                    monitor="val_macro_f1", patience=None, class_weight=None, stage="bench",
                    history=history, steps_per_epoch=steps)
    # fit_stage's epoch time includes its one-batch validation predict; subtract it.
    validation = [row["seconds"] for row in history]
    pipe_times = timer.times

    def rate(times: list[float]) -> float:
        steady = times[1:] or times
        return args.tiles / float(np.median(steady))

    result = {
        "architecture": args.architecture,
        "tiles": args.tiles,
        "input_size": args.size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "deterministic": args.deterministic,
        "online_augmentation": args.online_augmentation,
        "baseline_images_per_s": round(rate(base_times), 2),
        "pipeline_images_per_s": round(rate(pipe_times), 2),
        "ratio": round(rate(pipe_times) / rate(base_times), 3),
        "baseline_epoch_s": [round(t, 2) for t in base_times],
        "pipeline_epoch_s": [round(t, 2) for t in pipe_times],
        "pipeline_epoch_with_validation_s": [round(t, 2) for t in validation],
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
