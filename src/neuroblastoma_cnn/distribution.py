"""Training beyond one CPU: which ``tf.distribute`` strategy, which precision, XLA or not, and a
backup folder that lets an interrupted run resume.

Why decisions are separated from TensorFlow objects: :func:`plan` is a pure function of the
parameters and what the machine has (GPUs, ``TF_CONFIG``), so the rules are tested on a CPU-only
machine; :func:`make_strategy` and :func:`precision_policy` only carry them out.

Rules (also in conf/base/parameters_training.yml):

- ``distribution: auto``: ``MultiWorkerMirroredStrategy`` when ``TF_CONFIG`` is set (the
  standard TensorFlow contract), ``MirroredStrategy`` with more than one local GPU, else the
  default (one device, as before).
- ``precision: auto``: ``mixed_float16`` on GPU, ``float32`` on CPU. The output layer computes in
  float32, and :func:`as_float32` rebuilds a mixed-precision model in float32 before it is saved,
  so the saved model has the same structure whatever precision trained it.
- ``jit_compile: auto``: XLA on GPU only (on CPU it mostly adds compile time).
- ``batch_size`` is the *global* batch (split over replicas); with ``scale_learning_rate`` the
  learning rate grows linearly with the number of replicas (Goyal et al., 2017).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuroblastoma_cnn.errors import ParameterError

logger = logging.getLogger(__name__)

DISTRIBUTIONS = ("auto", "one_device", "mirrored", "multi_worker")
PRECISIONS = ("auto", "float32", "mixed_float16")


@dataclass(frozen=True)
class Plan:
    """What training will use: strategy name, dtype policy, XLA, number of workers."""

    strategy: str  # one_device | mirrored | multi_worker
    precision: str  # float32 | mixed_float16
    jit_compile: bool
    workers: int = 1


def _workers(tf_config: str | None) -> int:
    if not tf_config:
        return 1
    try:
        cluster = json.loads(tf_config).get("cluster", {})
    except ValueError as exc:
        raise ParameterError(f"TF_CONFIG is not valid JSON: {exc}") from exc
    return max(1, len(cluster.get("worker", [])) + len(cluster.get("chief", [])))


def plan(distribution: str, precision: str, jit_compile: bool | str, *, gpus: int,
         tf_config: str | None) -> Plan:
    """The training plan for these settings on a machine with ``gpus`` GPUs."""
    if distribution not in DISTRIBUTIONS:
        raise ParameterError(f"training.distribution = {distribution!r}: one of {DISTRIBUTIONS}")
    if precision not in PRECISIONS:
        raise ParameterError(f"training.precision = {precision!r}: one of {PRECISIONS}")
    if distribution == "auto":
        distribution = ("multi_worker" if tf_config else
                        "mirrored" if gpus > 1 else "one_device")
    if distribution == "multi_worker" and not tf_config:
        raise ParameterError("training.distribution = multi_worker needs TF_CONFIG (the "
                             "cluster and this worker's task) in the environment")
    if precision == "auto":
        precision = "mixed_float16" if gpus else "float32"
    jit = bool(gpus) if jit_compile == "auto" else bool(jit_compile)
    return Plan(distribution, precision, jit, _workers(tf_config))


def current_plan(distribution: str, precision: str, jit_compile: bool | str) -> Plan:
    """:func:`plan` for this machine (its GPUs and ``TF_CONFIG``)."""
    import tensorflow as tf  # noqa: PLC0415  (lazy: TensorFlow loads only to train)

    return plan(distribution, precision, jit_compile,
                gpus=len(tf.config.list_physical_devices("GPU")),
                tf_config=os.environ.get("TF_CONFIG"))


def make_strategy(chosen: Plan) -> Any:
    """The ``tf.distribute`` strategy of a plan (create it before any other TF op)."""
    import tensorflow as tf  # noqa: PLC0415  (lazy: TensorFlow loads only to train)

    if chosen.strategy == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if chosen.strategy == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def precision_policy(chosen: Plan) -> Any:
    """Sets Keras' global dtype policy for building the model; returns the previous one."""
    import keras  # noqa: PLC0415  (lazy: TensorFlow loads only to train)

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(chosen.precision)
    return previous


def scaled_learning_rate(learning_rate: float, replicas: int, scale: bool) -> float:
    """Linear scaling: the global batch grows with the replicas, so does the step size."""
    return learning_rate * replicas if scale else learning_rate


def as_float32(model: Any) -> Any:
    """The same model with every layer in float32 (weights copied): what is saved, so a model
    trained in mixed precision has the same structure as one trained in float32."""
    import keras  # noqa: PLC0415  (lazy: TensorFlow loads only to train)

    policy = getattr(model, "dtype_policy", None)
    if all(getattr(layer, "dtype_policy", policy).name == "float32"
           for layer in model._flatten_layers()):
        return model

    def clone(layer: Any) -> Any:
        config = layer.get_config()
        if "dtype" in config:
            config["dtype"] = "float32"
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    copy.set_weights(model.get_weights())
    for name in ("preprocessing", "model_source"):
        if hasattr(model, name):
            setattr(copy, name, getattr(model, name))
    return copy


def backup_folder(root: str | Path, model_name: str) -> Path:
    """``<root>/.backup/<model>``: Keras ``BackupAndRestore`` state of an unfinished run."""
    return Path(root) / ".backup" / model_name


def backup_callback(folder: Path) -> Any:
    """Saves the training state at every epoch end; a restarted run resumes from it."""
    import keras  # noqa: PLC0415  (lazy: TensorFlow loads only to train)

    folder.mkdir(parents=True, exist_ok=True)
    return keras.callbacks.BackupAndRestore(str(folder), save_freq="epoch",
                                            delete_checkpoint=True)


def clear_backup(folder: Path) -> None:
    """A finished run leaves no backup behind."""
    shutil.rmtree(folder, ignore_errors=True)
