"""Where a training step's time goes: TensorFlow's profiler on a few steps of the project's
ResNet34, its op times summed by kind.

The trace (``tf.profiler.experimental``, an XSpace protobuf) holds one event per executed op on
the host's compute threads, named ``<scope>/<op>:<OpType>``; each is put in one kind:
convolutions (forward), their gradients (input and filter), BatchNorm (forward and gradient),
element-wise (ReLU, add, multiply, padding, casts...), pooling, the optimizer (its variable
updates), the loss and the rest; the input pipeline's time is summed from the tf.data threads.
Shares are of the summed op time (two cores run ops in parallel, so it can exceed wall time).
Prints one JSON line per input size.

    python benchmarks/profile_training_step.py --sizes 64 128
    python benchmarks/profile_training_step.py --precision mixed_bfloat16 --batch-norm fused
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from neuroblastoma_cnn.models.families import build_model

#: (kind, op types) in the order they are tried; an op's scope decides "optimizer" and "loss".
KINDS = (
    ("convolution gradients", ("Conv2DBackpropInput", "Conv2DBackpropFilter")),
    ("convolutions", ("Conv2D", "FusedConv2D", "DepthwiseConv2dNative")),
    ("batchnorm (fused)", ("FusedBatchNormV3", "FusedBatchNormGradV3", "FusedBatchNormEx")),
    ("pooling", ("MaxPool", "MaxPoolGrad", "AvgPool", "Mean", "AvgPoolGrad")),
    ("dense", ("MatMul", "FusedMatMul", "BiasAdd", "BiasAddGrad")),
)
#: The scope of a BatchNormalization layer's ops (``conv1_bn``, ``conv2_block1_bn1``, ``_proj_bn``).
BN_SCOPE = re.compile(r"_bn\d*(_\d+)?/")
#: oneDNN's rewrites of an op type (``_MklNativeConv2DBackpropFilter`` is a Conv2DBackpropFilter).
ONEDNN_PREFIXES = ("_MklNative", "_Mkl", "_")


def kind_of(name: str) -> str:
    """The kind of a profiler event ``<scope>/<op>:<OpType>``."""
    scope, _, op_type = name.rpartition(":")
    for prefix in ONEDNN_PREFIXES:
        op_type = op_type.removeprefix(prefix)
    lowered = scope.lower()
    if any(word in lowered for word in ("/sgd", "optimizer", "assignsubvariable",
                                        "resourceapply", "assignaddvariable")):
        return "optimizer"
    for kind, types in KINDS:
        if op_type in types and kind.startswith("conv"):
            return kind
    if BN_SCOPE.search(scope):  # Keras' BatchNormalization: a dozen small ops forward and back
        return "batchnorm (fused)" if op_type.startswith("FusedBatchNorm") \
            else "batchnorm (Keras ops)"
    for kind, types in KINDS:
        if op_type in types:
            return kind
    if "loss" in lowered or "crossentropy" in lowered or "softmax" in op_type.lower():
        return "loss"
    return "element-wise and other"


def op_times(trace: Path) -> tuple[collections.Counter, float]:
    """(seconds per kind on the compute threads, seconds on the tf.data threads)."""
    space = xplane_pb2.XSpace()
    space.ParseFromString(trace.read_bytes())
    kinds: collections.Counter = collections.Counter()
    data = 0.0
    for plane in space.planes:
        names = plane.event_metadata
        for line in plane.lines:
            if line.name.startswith("tf_data"):
                data += sum(e.duration_ps for e in line.events
                            if names[e.metadata_id].name.startswith("Iterator::Root")) / 1e12
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = names[event.metadata_id].name
                if ":" in name and "/" in name:  # an op, not an executor or allocator event
                    kinds[kind_of(name)] += event.duration_ps / 1e12
    return kinds, data


def profile(size: int, batch: int, steps: int, precision: str,
            batch_norm: str) -> dict[str, Any]:
    keras.config.set_dtype_policy(precision)
    model = build_model("resnet34", size, 4, seed=0, batch_norm=batch_norm)
    keras.config.set_dtype_policy("float32")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch * steps, size, size, 3)).astype("float32")
    y = np.arange(batch * steps) % 4
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).prefetch(2)
    model.fit(train, epochs=1, verbose=0)  # traced outside the profile
    logdir = Path(tempfile.mkdtemp())
    tf.profiler.experimental.start(str(logdir))
    started = time.perf_counter()
    model.fit(train, epochs=1, verbose=0)
    wall = time.perf_counter() - started
    tf.profiler.experimental.stop()
    kinds, data = op_times(next(logdir.rglob("*.xplane.pb")))
    total = sum(kinds.values())
    return {
        "input_size": size, "batch_size": batch, "steps": steps, "precision": precision,
        "batch_norm": batch_norm,
        "wall_s_per_step": round(wall / steps, 3), "op_s_per_step": round(total / steps, 3),
        "shares": {k: round(v / total, 3) for k, v in kinds.most_common()},
        "input_pipeline_s_per_step": round(data / steps, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--batch-norm", default="keras", choices=("keras", "fused"))
    args = parser.parse_args()
    for size in args.sizes:
        print(json.dumps(profile(size, args.batch_size, args.steps, args.precision,
                                 args.batch_norm)))


if __name__ == "__main__":
    main()
