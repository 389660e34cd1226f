"""Cheap stand-ins for the Keras trial function, importable by spawned worker processes.

Each trial appends ``start`` and ``end`` lines (point, pid) to a log file, so a test can count
how often every (variant, repeat) really ran, across processes and restarts.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from neuroblastoma_cnn.pipelines.study import config
from neuroblastoma_cnn.trials.engine import TrialContext, TrialOutcome, TrialSpec

MODEL_PARAMS = {
    "m": {
        "model": {"architecture": "resnet34", "dropout": 0.0, "l1": 0.0},
        "training": {"optimizer": "sgd", "learning_rate": 0.01, "epochs": 3, "seed": 42,
                     "schedule": None},
    }
}


def study_params(storage: str, **studies: Any) -> dict[str, Any]:
    """A complete `study` block (every key the YAML has) around the given studies."""
    return {
        "name": next(iter(studies)) if studies else "dropout",
        "storage": storage,
        "workers": 1,
        "repeats": 3,
        "repeat_scheme": "folds",
        "model": "m",
        "seed": 0,
        "validation_fraction": 0.2,
        "heartbeat_seconds": 2,
        "max_retries": 2,
        "studies": studies or {
            "dropout": {"mode": "grid", "vary": {"model.dropout": [0.0, 0.25, 0.5]},
                        "baseline": {"model.dropout": 0.0}}
        },
    }


def grid_plan(storage: str, values: tuple = (0.0, 0.25, 0.5), repeats: int = 3,
              heartbeat: int = 2) -> config.StudyPlan:
    params = study_params(storage, dropout={
        "mode": "grid", "vary": {"model.dropout": list(values)},
        "baseline": {"model.dropout": values[0]}, "repeats": repeats})
    params["heartbeat_seconds"] = heartbeat
    return config.resolve_study(params, MODEL_PARAMS)


class LoggingObjective:
    """Score = 0.5 + dropout / 10 + repeat / 100; ``hang_on`` (a trial number) blocks that
    trial for ``hang_seconds`` so a test can kill its worker mid-trial."""

    def __init__(self, log: Path, sleep: float = 0.0, hang_on: int | None = None,
                 hang_seconds: float = 120.0):
        self.log = Path(log)
        self.sleep = sleep
        self.hang_on = hang_on
        self.hang_seconds = hang_seconds

    def _write(self, spec: TrialSpec, event: str) -> None:
        with self.log.open("a") as f:
            f.write(json.dumps({"variant": spec.variant, "repeat": spec.repeat,
                                "trial": spec.number, "pid": os.getpid(), "event": event}) + "\n")
            f.flush()

    def __call__(self, spec: TrialSpec, context: TrialContext) -> TrialOutcome:
        self._write(spec, "start")
        if spec.number == self.hang_on:
            time.sleep(self.hang_seconds)
        time.sleep(self.sleep)
        dropout = float(spec.params["model"]["dropout"])
        score = 0.5 + dropout / 10 + spec.repeat / 100
        for epoch in range(1, 4):
            context.report(epoch, score * epoch / 3)
        self._write(spec, "end")
        return TrialOutcome(objective=score, metrics={
            "f1_macro": score, "accuracy": score - 0.05, "f1_A": score + 0.1, "f1_B": score - 0.1,
        })


class SupersededObjective(LoggingObjective):
    """Trial ``on_trial`` is failed behind its back while it runs, as a worker that missed its
    heartbeats would be by another worker's stale check; it then finishes normally."""

    def __init__(self, log: Path, storage: str, study_name: str, on_trial: int):
        super().__init__(log)
        self.storage, self.study_name, self.on_trial = storage, study_name, on_trial

    def __call__(self, spec: TrialSpec, context: TrialContext) -> TrialOutcome:
        if spec.number == self.on_trial:
            study = optuna.load_study(study_name=self.study_name, storage=self.storage)
            trial = next(t for t in study.get_trials() if t.number == spec.number)
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        return super().__call__(spec, context)


def read_log(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def search_objective(spec: TrialSpec, context: TrialContext) -> TrialOutcome:
    """Search stand-in: higher dropout and a learning rate near 0.01 score better; reports
    three epochs so the median pruner has something to compare."""
    dropout = float(spec.params["model"]["dropout"])
    lr = float(spec.params["training"]["learning_rate"])
    score = 0.4 + 0.3 * dropout - 0.05 * abs(math.log10(lr) + 2)
    for epoch in range(1, 4):
        context.report(epoch, score * epoch / 3)
    return TrialOutcome(objective=score, metrics={"f1_macro": score - 0.02, "accuracy": score})
