"""Training beyond one CPU: which ``tf.distribute`` strategy, which precision, XLA or not, and a
backup folder that lets an interrupted run resume.

Why decisions are separated from TensorFlow objects: :func:`plan` is a pure function of the
parameters and what the machine has (GPUs, ``TF_CONFIG``), so the rules are tested on a CPU-only
machine; :func:`make_strategy` and :func:`precision_policy` only carry them out.

Rules (also in conf/base/parameters_training.yml):

- ``distribution: auto``: ``MultiWorkerMirroredStrategy`` when ``TF_CONFIG`` is set (the
  standard TensorFlow contract), ``MirroredStrategy`` with more than one local GPU, else the
  default (one device, as before).
- ``precision: auto``: ``mixed_float16`` on GPU; on a CPU with bfloat16 matrix instructions
  (AMX-BF16 or AVX-512 BF16, :func:`cpu_bf16`) ``mixed_bfloat16``, which trains the same
  network with the same loss about twice as fast there (README "Training speed", with the
  fold-by-fold comparison against float32); ``float32`` on other CPUs, where bfloat16 is
  emulated and slower. The output layer computes in float32, and :func:`as_float32` rebuilds a
  mixed-precision model in float32 before it is saved, so the saved model has the same structure
  whatever precision trained it.
- ``jit_compile: auto``: XLA on GPU only (on CPU it mostly adds compile time).
- ``batch_size`` is the *global* batch (split over replicas); with ``scale_learning_rate`` the
  learning rate grows linearly with the number of replicas (Goyal et al., 2017).

Resume: each training stage keeps, in a run folder (:func:`run_folder`), Keras'
``BackupAndRestore`` checkpoint (weights, optimizer) and, per epoch, what Keras does not save:
the best-epoch bookkeeping, the history rows and the layers' random-number states
(:func:`epoch_state_callback`); a finished stage leaves its result (:func:`save_stage_result`),
a finished run removes the folder. A run restarted with the same parameters and data resumes
from its last finished epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import numpy as np

from neuroblastoma_cnn.core.errors import ParameterError
from neuroblastoma_cnn.core.types import Distribution, Precision

logger = logging.getLogger(__name__)

DISTRIBUTIONS: tuple[str, ...] = get_args(Distribution)
PRECISIONS: tuple[str, ...] = get_args(Precision)


@dataclass(frozen=True)
class Plan:
    """What training will use: strategy name, dtype policy, XLA, number of workers."""

    strategy: str  # one_device | mirrored | multi_worker
    precision: str  # float32 | mixed_float16 | mixed_bfloat16
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


#: /proc/cpuinfo flags of x86 CPUs that multiply bfloat16 natively (oneDNN uses them).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bfloat16 natively (Linux x86: AMX-BF16 or AVX-512 BF16); False
    where it cannot be read (another OS): ``precision: auto`` then stays float32."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def plan(distribution: str, precision: str, jit_compile: bool | str, *, gpus: int,
         tf_config: str | None, bf16_cpu: bool = False) -> Plan:
    """The training plan for these settings on a machine with ``gpus`` GPUs (and, without one, a
    CPU that multiplies bfloat16 natively or not: ``bf16_cpu``)."""
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
        precision = ("mixed_float16" if gpus else
                     "mixed_bfloat16" if bf16_cpu else "float32")
    jit = bool(gpus) if jit_compile == "auto" else bool(jit_compile)
    return Plan(distribution, precision, jit, _workers(tf_config))


def current_plan(distribution: str, precision: str, jit_compile: bool | str) -> Plan:
    """:func:`plan` for this machine (its GPUs and ``TF_CONFIG``)."""
    import tensorflow as tf  # noqa: PLC0415  (lazy: TensorFlow loads only to train)

    gpus = len(tf.config.list_physical_devices("GPU"))
    bf16 = not gpus and cpu_bf16()  # /proc/cpuinfo read once
    chosen = plan(distribution, precision, jit_compile, gpus=gpus,
                  tf_config=os.environ.get("TF_CONFIG"), bf16_cpu=bf16)
    slow = slow_precision(chosen.precision, gpus=gpus, bf16_cpu=bf16)
    if slow:
        logger.warning(slow)
    if precision == "auto":
        reason = (f"{gpus} GPU(s)" if gpus else "this CPU multiplies bfloat16 natively" if bf16
                  else "no native bfloat16 on this CPU")
        logger.info("precision: auto -> %s (%s)", chosen.precision, reason)
    return chosen


def slow_precision(precision: str, *, gpus: int, bf16_cpu: bool) -> str | None:
    """A line saying that ``precision`` runs emulated here (the same maths, slower), or None:
    asked for explicitly, it is kept, never swapped silently for another."""
    if gpus or precision == "float32":
        return None
    if precision == "mixed_float16" or (precision == "mixed_bfloat16" and not bf16_cpu):
        return (f"training.precision = {precision}: this CPU has no native "
                f"{precision.removeprefix('mixed_')} arithmetic, so it is emulated and slower "
                f"than float32; set precision: auto (README 'Training speed').")
    return None


_STRATEGIES: dict[str, Any] = {}


def make_strategy(chosen: Plan) -> Any:
    """The ``tf.distribute`` strategy of a plan (create it before any other TF op). One per
    process and kind: a second ``MultiWorkerMirroredStrategy`` cannot join the cluster again."""
    import tensorflow as tf  # noqa: PLC0415  (lazy: TensorFlow loads only to train)

    if chosen.strategy not in ("multi_worker", "mirrored"):
        return tf.distribute.get_strategy()
    if chosen.strategy not in _STRATEGIES:
        _STRATEGIES[chosen.strategy] = (
            tf.distribute.MultiWorkerMirroredStrategy() if chosen.strategy == "multi_worker"
            else tf.distribute.MirroredStrategy())
    return _STRATEGIES[chosen.strategy]


def worker_index(tf_config: str | None = None) -> int | None:
    """This process's index among the workers of ``TF_CONFIG`` (the chief, if any, first);
    None without a cluster."""
    raw = os.environ.get("TF_CONFIG") if tf_config is None else tf_config
    if not raw:
        return None
    config = json.loads(raw)
    task = config.get("task", {})
    after_chief = "chief" in config.get("cluster", {}) and task.get("type") == "worker"
    return int(task.get("index", 0)) + int(after_chief)


def is_chief(tf_config: str | None = None) -> bool:
    """True for the process that writes outputs: the only one, the ``chief`` task, or worker 0
    of a cluster without a chief (TensorFlow's convention)."""
    return worker_index(tf_config) in (None, 0)


def average_local_statistics(model: Any, strategy: Any) -> None:
    """Makes the non-trainable weights (batch-normalisation moving statistics) the mean over
    the cluster's workers, on every worker.

    Why: gradients are all-reduced, so trainable weights agree, but each worker updates its
    moving statistics from its own shard of every batch; without this the workers end with
    different models (the chief's saved, the others' silently different)."""
    import tensorflow as tf  # noqa: PLC0415

    variables = list(model.non_trainable_weights)
    if not variables:
        return
    local = [np.asarray(v.numpy()) for v in variables]
    flat = np.concatenate([x.ravel().astype(np.float64) for x in local])  # one collective
    value = strategy.experimental_distribute_values_from_function(
        lambda _context: tf.constant(flat))
    mean = strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None).numpy()
    offset = 0
    for variable, array in zip(variables, local, strict=True):
        variable.assign(mean[offset:offset + array.size].reshape(array.shape).astype(array.dtype))
        offset += array.size


def weights_digest(model: Any) -> str:
    """A SHA-256 of a model's weights, to show that the workers of a cluster agree."""
    digest = hashlib.sha256()
    for weights in model.get_weights():
        digest.update(np.ascontiguousarray(weights).tobytes())
    return digest.hexdigest()


def precision_policy(chosen: Plan) -> Any:
    """Sets Keras' global dtype policy for building the model; returns the previous one."""
    import keras  # noqa: PLC0415  (lazy: TensorFlow loads only to train)

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(chosen.precision)
    return previous


def fix_keras_multi_worker(model: Any, strategy: Any) -> None:
    """Two workarounds that let Keras 3 (3.15 included) ``fit`` under
    ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585); nothing for other strategies.

    - Keras first averages one input batch over the replicas of the strategy the model was
      built in, to build it; that reduction of an ``(images, labels)`` batch fails under MWMS.
      With the strategy taken from the scope instead, the model is built when its step is
      traced, as tf.keras did; compile, fit and predict must then run in ``strategy.scope()``.
    - Keras averages each step's logs over the workers along axis 0, which scalars lack: the
      step's logs are given that axis (the weights get the all-reduced gradients either way).
    """
    import tensorflow as tf  # noqa: PLC0415  (lazy: TensorFlow loads only to train)

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    model._distribute_strategy = None
    if getattr(model, "_multi_worker_logs", False):
        return
    step = model.train_step

    def train_step(data: Any) -> dict[str, Any]:
        return {name: tf.reshape(value, [1]) for name, value in step(data).items()}

    model.train_step = train_step
    model._multi_worker_logs = True


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


def default_backup_root() -> Path:
    """The project's ``data`` folder (git-ignored) when run from the project, else the
    system's temporary folder: never a stray ``data`` folder wherever a script runs."""
    data = Path("data")
    return data if data.is_dir() else Path(tempfile.gettempdir()) / "neuroblastoma_cnn"


def fingerprint(*parts: Any) -> str:
    """A short hash of what defines a run (parameters, data): a restarted run finds its own
    backup, and a run with anything changed (a study's next trial) never resumes another's."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def run_folder(root: str | Path, model_name: str, run_key: str,
               tf_config: str | None = None) -> Path:
    """``<root>/.backup/<model>/<run_key>``, one sub-folder per worker of a cluster (workers
    must not write the same files)."""
    folder = backup_folder(root, model_name) / run_key
    index = worker_index(tf_config)
    return folder if index is None else folder / f"worker-{index}"


def backup_callback(folder: Path, delete_checkpoint: bool = True,
                    keep_previous: bool = False) -> Any:
    """Saves the training state at every epoch end; a restarted run resumes from it. With
    ``keep_previous`` (clusters) the previous epoch's checkpoint stays beside it
    (``*.bkp``), so that a worker an epoch ahead of the others can step back
    (:func:`agree_on_resume`)."""
    import keras  # noqa: PLC0415  (lazy: TensorFlow loads only to train)

    folder.mkdir(parents=True, exist_ok=True)
    return keras.callbacks.BackupAndRestore(str(folder), save_freq="epoch",
                                            double_checkpoint=keep_previous,
                                            delete_checkpoint=delete_checkpoint)


def clear_backup(folder: Path) -> None:
    """A finished run leaves no backup behind."""
    shutil.rmtree(folder, ignore_errors=True)


def clear_run(folder: Path) -> None:
    """Removes a run's backup, then its parent folders up to ``.backup`` while they are empty
    (other runs' folders stay)."""
    clear_backup(folder)
    for parent in folder.parents:
        try:
            parent.rmdir()
        except OSError:
            break
        if parent.name == ".backup":
            break


def resumed_epoch(folder: Path | None) -> int:
    """Epochs a stage's backup has finished (0 without one): known before ``fit`` starts, so
    the training input can begin at the resumed epoch's batches."""
    if folder is None:
        return 0
    metadata = folder / "training_metadata.json"  # written by Keras' BackupAndRestore
    if not metadata.is_file():
        return 0
    return int(json.loads(metadata.read_text())["epoch"])


def stage_progress(stage_folder: Path, epochs: int) -> int:
    """How far a stage's backup is: the epochs it has backed up, or ``epochs + 1`` once the
    stage has finished (its result saved, its epoch backups gone)."""
    if (stage_folder / "done.json").is_file():
        return epochs + 1
    return resumed_epoch(stage_folder / "epochs")


def cluster_resume(progress: list[int], epochs: int) -> int:
    """The progress every worker resumes a stage from, given each worker's
    (:func:`stage_progress`): the same on all workers, since each decides from the same list.

    Workers in step resume there. A worker one epoch ahead steps back to the others' epoch (its
    previous checkpoint is kept). Anything else (a worker that finished the stage, or the whole
    run, beside one that had not) cannot be brought to one epoch: the stage starts again (0)."""
    low, high = min(progress), max(progress)
    if low == high:
        return low
    if high - low == 1 and high <= epochs:
        return low
    return 0


def step_back(epochs_folder: Path) -> None:
    """Makes a stage's epoch backup one epoch older: Keras' previous checkpoint (``*.bkp``)
    becomes the current one; the epoch state of that epoch is still there (the epoch-state
    callback keeps two epochs)."""
    done = resumed_epoch(epochs_folder)
    if done <= 1:
        clear_backup(epochs_folder)
        return
    for name in ("latest.weights.h5", "training_metadata.json"):
        previous = epochs_folder / f"{name}.bkp"
        if not previous.is_file():
            raise RuntimeError(f"{epochs_folder} holds no previous checkpoint ({previous.name}) "
                               f"to step back to epoch {done - 1}")
        os.replace(previous, epochs_folder / name)
    if resumed_epoch(epochs_folder) != done - 1:
        raise RuntimeError(f"{epochs_folder}: the previous checkpoint is not epoch {done - 1}")


def multi_worker(strategy: Any) -> bool:
    """Whether ``strategy`` is a ``MultiWorkerMirroredStrategy`` (its workers back up apart)."""
    import tensorflow as tf  # noqa: PLC0415  (lazy: TensorFlow loads only to train)

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def agree_on_resume(stage_folder: Path, epochs: int, strategy: Any) -> None:
    """Brings every worker of a ``MultiWorkerMirroredStrategy`` cluster to the same point of a
    stage before it resumes (nothing for other strategies).

    Why: each worker backs up into its own folder (:func:`run_folder`) after the epoch's last
    collective, so a kill can fall between two workers' writes and leave one worker an epoch
    ahead. Workers resuming at different epochs would run different numbers of steps: their
    collectives would mix epochs or hang, and the models would differ. One collective here
    gathers every worker's progress; :func:`cluster_resume` picks the point all can reach."""
    import tensorflow as tf  # noqa: PLC0415  (lazy: TensorFlow loads only to train)

    if not multi_worker(strategy):
        return
    local = stage_progress(stage_folder, epochs)
    value = strategy.experimental_distribute_values_from_function(
        lambda _context: tf.constant([local], tf.int64))
    progress = [int(x) for x in strategy.gather(value, axis=0).numpy()]
    agreed = cluster_resume(progress, epochs)
    if agreed == local:
        return
    if agreed == 0:
        logger.warning("Workers' backups of %s disagree (%s epochs done, %d = finished): "
                       "the stage starts again on every worker", stage_folder.name,
                       progress, epochs + 1)
        clear_backup(stage_folder)
        return
    logger.warning("Worker %s backed up epoch %d, another worker only epoch %d: stepping "
                   "back to it", worker_index(), local, agreed)
    step_back(stage_folder / "epochs")


# ------------------------------------------------------------------ what Keras does not save


def rng_states(model: Any) -> list[np.ndarray]:
    """The states of the layers' seed generators (dropout masks...): not in Keras' weights
    files, yet a resumed run must draw what the uninterrupted one drew."""
    return [np.asarray(generator.state.numpy())
            for layer in model._flatten_layers()
            for generator in getattr(layer, "_seed_generators", [])]


def set_rng_states(model: Any, states: list[np.ndarray]) -> None:
    generators = [generator for layer in model._flatten_layers()
                  for generator in getattr(layer, "_seed_generators", [])]
    if len(generators) != len(states):
        raise ValueError(f"{len(states)} saved random states for {len(generators)} generators")
    for generator, state in zip(generators, states, strict=True):
        generator.state.assign(state)


def _write_npz(path: Path, arrays: list[np.ndarray]) -> None:
    """Written beside, then renamed: a kill mid-write leaves the previous file whole."""
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, *arrays)
    os.replace(partial, path)


def _read_npz(path: Path) -> list[np.ndarray]:
    with np.load(path) as stored:
        return [stored[f"arr_{i}"] for i in range(len(stored.files))]


def _write_json(path: Path, value: Any) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value))
    os.replace(partial, path)


def epoch_state_callback(folder: Path, get_state: Callable[[], dict[str, Any]],
                         set_state: Callable[[dict[str, Any]], None],
                         best_weights: Callable[[], tuple[int, list[np.ndarray] | None]],
                         set_best_weights: Callable[[list[np.ndarray]], None]) -> Any:
    """Per epoch, what ``BackupAndRestore`` leaves out: ``get_state()`` (JSON: history rows,
    best-epoch bookkeeping), the random states and the best epoch's weights; restored at the
    start of a resumed ``fit``. Put it after the callbacks whose state it saves and before
    ``BackupAndRestore``, so that the state of every epoch that checkpoint holds exists."""
    import keras  # noqa: PLC0415  (lazy: TensorFlow loads only to train)

    class EpochState(keras.callbacks.Callback):
        def on_train_begin(self, logs: dict | None = None) -> None:
            done = resumed_epoch(folder)
            if not done:
                return
            state = json.loads((folder / f"state-{done}.json").read_text())
            set_rng_states(self.model, _read_npz(folder / f"rng-{done}.npz"))
            if state["best_file"]:
                set_best_weights(_read_npz(folder / state["best_file"]))
            set_state(state["callbacks"])
            logger.info("Resuming after epoch %d from %s", done, folder)

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            done = epoch + 1
            best_epoch, weights = best_weights()
            best_file = f"best-{best_epoch + 1}.npz" if weights is not None else None
            if best_file and (best_epoch == epoch or not (folder / best_file).exists()):
                _write_npz(folder / best_file, weights)
            _write_npz(folder / f"rng-{done}.npz", rng_states(self.model))
            _write_json(folder / f"state-{done}.json",
                        {"callbacks": get_state(), "best_file": best_file})
            self._prune(keep={f"state-{done}.json", f"state-{done - 1}.json",
                              f"rng-{done}.npz", f"rng-{done - 1}.npz"})

        def _prune(self, keep: set[str]) -> None:
            """Keeps this epoch's and the previous epoch's files (Keras' checkpoint may still
            be the previous epoch's when a kill comes) and the best weights they name."""
            for name in list(keep):
                if name.startswith("state-") and (folder / name).exists():
                    best = json.loads((folder / name).read_text())["best_file"]
                    keep.add(best or "")
            for path in folder.glob("*"):
                if path.name.startswith(("state-", "rng-", "best-")) and path.name not in keep:
                    path.unlink(missing_ok=True)

    folder.mkdir(parents=True, exist_ok=True)
    return EpochState()


def save_stage_result(folder: Path, weights: list[np.ndarray], rng: list[np.ndarray],
                      state: dict[str, Any]) -> None:
    """A finished stage's weights, random states and result: a run killed in a later stage
    restarts there instead of training this one again."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_npz(folder / "done-weights.npz", weights)
    _write_npz(folder / "done-rng.npz", rng)
    _write_json(folder / "done.json", state)


def load_stage_result(folder: Path | None
                      ) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, Any]] | None:
    """What :func:`save_stage_result` wrote, or None when the stage has not finished."""
    if folder is None or not (folder / "done.json").is_file():
        return None
    return (_read_npz(folder / "done-weights.npz"), _read_npz(folder / "done-rng.npz"),
            json.loads((folder / "done.json").read_text()))
