"""Resume after interruption, and training on two workers (MultiWorkerMirroredStrategy on
loopback): a run interrupted after an epoch and started again ends with the weights and history
of an uninterrupted one; two workers train one model that the chief alone saves."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from _train_child import train, write_stores

from neuroblastoma_cnn.datasets.tile_store import TileStore

CHILD = Path(__file__).with_name("_train_child.py")
#: The study's path (one reshuffled pass an epoch) with a plateau schedule and early stopping,
#: beside the child's default recipe (balanced sampling, online augmentation, warm-up cosine).
STUDY = {"sampling": "shuffle", "steps_per_epoch": None, "label_smoothing": 0.0,
         "schedule": {"type": "plateau", "factor": 0.5, "patience": 1},
         "early_stopping_patience": 2, "monitor_window": 1, "online_augmentation": False}


class Interrupted(RuntimeError):
    """Raised mid-epoch: the process survives, but only the backup carries over."""


class InterruptAt(keras.callbacks.Callback):
    def __init__(self, epoch: int):
        super().__init__()
        self.at, self.epoch = epoch, -1

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == self.at and batch == 0:
            raise Interrupted(f"epoch {self.at + 1}")


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("stores")
    write_stores(folder)
    return folder


def _same_run(model: keras.Model, history: pd.DataFrame, reference: keras.Model,
              ref_history: pd.DataFrame) -> None:
    for a, b in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    pd.testing.assert_frame_equal(history.drop(columns="seconds"),
                                  ref_history.drop(columns="seconds"))


@pytest.mark.parametrize("overrides", [{}, STUDY, {"ema_momentum": 0.7}],
                         ids=["recipe", "study_plateau", "weight_average"])
def test_an_interrupted_run_resumes_with_the_same_weights_and_history(stores, tmp_path,
                                                                      overrides):
    reference, ref_history = train(stores, overrides, tmp_path / "reference")
    root = tmp_path / "run"
    with pytest.raises(Interrupted):
        train(stores, overrides, root, [InterruptAt(2)])
    [metadata] = root.glob(".backup/resnet34/*/train/epochs/training_metadata.json")
    assert json.loads(metadata.read_text())["epoch"] == 2  # two epochs done, the third cut
    model, history = train(stores, overrides, root)
    _same_run(model, history, reference, ref_history)
    assert not (root / ".backup").exists()  # a finished run clears its backup


class StopAfterEpochs(keras.callbacks.Callback):
    """Raises at the end of the ``count``-th epoch over all stages (before that epoch's
    backup, as a kill would)."""

    def __init__(self, count: int):
        super().__init__()
        self.count, self.seen = count, 0

    def on_epoch_end(self, epoch, logs=None):
        self.seen += 1
        if self.seen == self.count:
            raise Interrupted(f"after {self.count} epochs")


@pytest.mark.integration
@pytest.mark.slow
def test_a_transfer_run_interrupted_in_fine_tuning_resumes_there(stores, tmp_path):
    """ResNet50 (random weights, 32 px): the head stage's result is reused, fine-tuning resumes
    after its last backed-up epoch; weights and history as uninterrupted."""
    from _params import params  # noqa: PLC0415
    from _train_child import RECIPE  # noqa: PLC0415

    from neuroblastoma_cnn.pipelines.training import nodes  # noqa: PLC0415

    split = pd.read_csv(stores / "split.csv")
    augment = {**params("resnet50.training").online_augmentation.model_dump(), "enabled": True}
    training = params("resnet50.training", **{
        **RECIPE, "online_augmentation": augment, "epochs": 1, "early_stopping_patience": None,
        "fine_tune_blocks": 1, "fine_tune_epochs": 2, "fine_tune_learning_rate": 0.001})

    def run(root: Path, callbacks=()):
        return nodes.train_model(TileStore(stores / "train"), TileStore(stores / "tiles"),
                                 split, params("resnet50.model", weights=None), training,
                                 callbacks=callbacks, backup_root=root)

    reference, ref_history = run(tmp_path / "reference")
    root = tmp_path / "run"
    with pytest.raises(Interrupted):
        run(root, [StopAfterEpochs(3)])  # the head epoch, then the 2nd fine-tuning epoch
    [run_folder] = root.glob(".backup/resnet50/*")
    assert (run_folder / "head" / "done.json").exists()
    assert nodes.distribution.resumed_epoch(run_folder / "fine_tune" / "epochs") == 1
    model, history = run(root)
    assert list(history["stage"]) == ["head"] + ["fine_tune"] * 2
    _same_run(model, history, reference, ref_history)
    assert not (root / ".backup").exists()


def test_a_finished_stage_is_not_trained_again(stores, tmp_path):
    """A run killed in a later stage reuses an earlier stage's result (ResNet50's head stage
    before fine-tuning): here, the stage's result survives the run that wrote it."""
    from _train_child import tiny_cnn  # noqa: PLC0415

    from neuroblastoma_cnn.pipelines.training import nodes  # noqa: PLC0415

    tiles = TileStore(stores / "tiles")
    split = pd.read_csv(stores / "split.csv")
    val = split[split["split"] == "validation"]
    x = tiles.get(val["tile_id"].tolist()).astype("float32")
    y = val["label"].map({"alpha": 0, "beta": 1, "gamma": 2}).to_numpy()
    common = {"epochs": 2, "num_classes": 3, "monitor": "val_loss", "patience": None,
              "class_weight": None, "stage": "head", "backup": tmp_path / "head"}
    first: list[dict] = []
    model = tiny_cnn("m", 32, 3, seed=1)
    kept = nodes.fit_stage(model, (x, y), x, y, optimizer=keras.optimizers.Adam(0.05),
                           history=first, **common)
    assert (tmp_path / "head" / "done.json").exists()
    assert not (tmp_path / "head" / "epochs").exists()
    again: list[dict] = []
    fresh = tiny_cnn("m", 32, 3, seed=2)
    assert nodes.fit_stage(fresh, (x, y), x, y, optimizer=keras.optimizers.Adam(0.05),
                           history=again, **common) == kept
    pd.testing.assert_frame_equal(pd.DataFrame(again), pd.DataFrame(first))  # NaN-safe
    for a, b in zip(fresh.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_defaults_on_cpu_are_the_explicit_single_device_run(stores, tmp_path):
    """``distribution/precision/jit_compile: auto`` on this CPU trains exactly as one device
    without XLA in the precision the CPU multiplies natively (float32, or mixed bfloat16 where
    it has AMX-BF16 / AVX-512 BF16)."""
    from neuroblastoma_cnn.runtime.distribution import cpu_bf16  # noqa: PLC0415

    auto, auto_history = train(stores, {"epochs": 2}, tmp_path / "a")
    precision = "mixed_bfloat16" if cpu_bf16() else "float32"
    explicit, history = train(stores, {"epochs": 2, "distribution": "one_device",
                                       "precision": precision, "jit_compile": False},
                              tmp_path / "b")
    _same_run(explicit, history, auto, auto_history)


def _child(stores: Path, out: Path, root: Path, overrides: dict, slow: float = 0.0,
           env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    args = [sys.executable, str(CHILD), str(stores), str(out), str(root), json.dumps(overrides)]
    if slow:
        args.append(str(slow))
    environment = {name: value for name, value in os.environ.items() if name != "TF_CONFIG"}
    environment.update({"TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})})
    stderr = log.open("w") if log else subprocess.DEVNULL
    return subprocess.Popen(args, env=environment, stdout=subprocess.DEVNULL, stderr=stderr)


def _stop(children: list[subprocess.Popen]) -> None:
    for child in children:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)


def _weights(path: Path) -> list[np.ndarray]:
    with np.load(path) as stored:
        return [stored[f"arr_{i}"] for i in range(len(stored.files))]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_killed_run_restarts_after_its_last_epoch(stores, tmp_path):
    """SIGKILL mid-epoch (after the backup of epoch 1), then the same command again: same
    weights as an uninterrupted run, and no backup left."""
    reference, _ = train(stores, {}, tmp_path / "reference")
    root, out = tmp_path / "run", tmp_path / "weights.npz"
    child = _child(stores, out, root, {}, slow=0.4)
    try:
        deadline = time.monotonic() + 120
        metadata: list[Path] = []
        while not metadata and time.monotonic() < deadline and child.poll() is None:
            metadata = list(root.glob(".backup/resnet34/*/train/epochs/training_metadata.json"))
            time.sleep(0.05)
        assert metadata, "the child wrote no backup"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        _stop([child])
    done = json.loads(metadata[0].read_text())["epoch"]
    assert 1 <= done < 4 and not out.exists()  # killed mid-run
    log = tmp_path / "restart.log"
    restart = _child(stores, out, root, {}, log=log)
    try:
        assert restart.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        _stop([restart])
    assert f"Resuming after epoch {done}" in log.read_text()
    for a, b in zip(_weights(out), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not (root / ".backup").exists()


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _cluster(stores: Path, folder: Path, name: str, root: Path,
             slow: float = 0.0) -> tuple[list[subprocess.Popen], list[Path]]:
    """Both workers of a new loopback cluster, writing ``<name><index>.npz/.csv/.keras/.log``
    into ``folder``. float32: the kept epoch's validation loss is compared with the saved
    (float32) model's to 1e-5, which a bfloat16 validation pass would not reach."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    children, logs = [], []
    for index in range(2):
        config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        logs.append(folder / f"{name}{index}.log")
        children.append(_child(stores, folder / f"{name}{index}.npz", root,
                               {"precision": "float32"}, slow=slow,
                               env={"TF_CONFIG": config}, log=logs[-1]))
    return children, logs


def _finish(children: list[subprocess.Popen], logs: list[Path]) -> None:
    try:
        for child, log in zip(children, logs, strict=True):
            assert child.wait(timeout=200) == 0, log.read_text()[-3000:]
    finally:
        _stop(children)


@pytest.fixture(scope="module")
def two_workers(stores, tmp_path_factory) -> Path:
    """An uninterrupted two-worker run: ``worker<index>.*`` in the returned folder."""
    folder = tmp_path_factory.mktemp("two_workers")
    _finish(*_cluster(stores, folder, "worker", folder / "root"))
    return folder


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_workers_train_one_model_that_the_chief_saves(stores, two_workers):
    tmp_path = two_workers
    logs = [tmp_path / f"worker{index}.log" for index in range(2)]
    assert "multi_worker, 2 replica(s)" in logs[0].read_text()
    assert sorted(p.name for p in tmp_path.glob("*.keras")) == ["worker0.keras"]  # the chief
    for a, b in zip(_weights(tmp_path / "worker0.npz"), _weights(tmp_path / "worker1.npz"),
                    strict=True):
        np.testing.assert_array_equal(a, b)  # the workers kept one model in step
    model = keras.models.load_model(tmp_path / "worker0.keras")
    tiles = TileStore(stores / "tiles")
    split = pd.read_csv(stores / "split.csv")
    val = split[split["split"] == "validation"]
    prob = model.predict(tiles.get(val["tile_id"].tolist()).astype("float32"), verbose=0)
    assert prob.shape == (len(val), 3) and np.allclose(prob.sum(axis=1), 1.0, atol=1e-5)
    # The validation pass was gathered from both workers in order: the kept epoch's loss is
    # the saved model's loss on the validation tiles.
    history = pd.read_csv(tmp_path / "worker0.csv")
    y = val["label"].map({"alpha": 0, "beta": 1, "gamma": 2}).to_numpy()
    loss = -np.log(np.clip(prob[np.arange(len(y)), y], 1e-7, 1.0)).mean()
    assert np.isclose(history["val_loss"], loss, atol=1e-5).any()
    assert not (tmp_path / "root" / ".backup").exists()


def _epoch(metadata: Path) -> int:
    """The epoch a worker's ``BackupAndRestore`` metadata names; 0 while absent or half
    written."""
    try:
        return int(json.loads(metadata.read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("behind", [0, 1], ids=["in_step", "worker1_an_epoch_behind"])
def test_two_killed_workers_restart_after_their_last_epoch(stores, two_workers, tmp_path,
                                                           behind):
    """SIGKILL of both workers mid-run (after each backed up an epoch), then both started
    again: they resume after that epoch and end as the uninterrupted two-worker run, one model
    in step, saved by the chief alone. ``worker1_an_epoch_behind``: worker 1's backup is one
    epoch older, as when the kill falls between the two workers' backups of an epoch; worker 0
    steps back to it."""
    root = tmp_path / "root"
    children, logs = _cluster(stores, tmp_path, "killed", root, slow=0.4)
    metadata: list[Path] = []
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and all(c.poll() is None for c in children):
            found = [sorted(root.glob(f".backup/resnet34/*/worker-{index}/train/epochs/"
                                      "training_metadata.json")) for index in range(2)]
            if all(found) and min(_epoch(f[0]) for f in found) >= 1 + behind:
                metadata = [f[0] for f in found]
                break
            time.sleep(0.05)
        assert metadata, [log.read_text()[-2000:] for log in logs]
        for child in children:
            child.send_signal(signal.SIGKILL)
        for child in children:
            child.wait(timeout=30)
    finally:
        _stop(children)
    assert not list(tmp_path.glob("killed*.npz"))  # killed mid-run
    if behind:  # worker 1 as if killed before writing its last epoch's checkpoint
        for name in ("latest.weights.h5", "training_metadata.json"):
            os.replace(metadata[1].with_name(f"{name}.bkp"), metadata[1].with_name(name))
    done = [_epoch(path) for path in metadata]
    assert all(1 <= epoch < 4 for epoch in done) and max(done) - min(done) == behind, done

    _finish(*_cluster(stores, tmp_path, "worker", root))
    texts = [(tmp_path / f"worker{index}.log").read_text() for index in range(2)]
    for text in texts:
        assert f"Resuming after epoch {min(done)} from" in text
    assert ("stepping back" in texts[0]) == bool(behind)
    assert sorted(p.name for p in tmp_path.glob("*.keras")) == ["worker0.keras"]  # the chief
    reference = _weights(two_workers / "worker0.npz")
    for index in range(2):
        for a, b in zip(_weights(tmp_path / f"worker{index}.npz"), reference, strict=True):
            np.testing.assert_array_equal(a, b)  # in step, and as if never killed
        history = pd.read_csv(tmp_path / f"worker{index}.csv")
        assert list(history["epoch"]) == [1, 2, 3, 4]  # the epochs went on from the backup
        pd.testing.assert_frame_equal(history, pd.read_csv(two_workers / "worker0.csv"))
    assert not (root / ".backup").exists()
