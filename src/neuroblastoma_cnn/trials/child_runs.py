"""MLflow child runs for trials (a study's variants and repeats, a cross-validation's folds).

Named ``child_runs``, not ``tracking``: the package's ``tracking/`` is the project's run records.
kedro-mlflow opens one run per ``kedro run``; a study's trials are MLflow *child* runs of the
study's parent run (the run of the ``kedro run`` that created the study, recorded in the Optuna
storage), so that every trial of a study sits under one parent in the MLflow UI even when it
ran in another process, was resumed later or ran on another machine. Child runs are written
through ``MlflowClient`` with an explicit run id, never through MLflow's active-run stack:
worker processes have no active run, and the parent run stays the active one in the main
process.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LENGTH = 6000


@dataclass(frozen=True)
class TrackingTarget:
    """Where child runs go: a tracking URI, an experiment and the study's parent run."""

    uri: str
    experiment_id: str
    parent_run_id: str

    def with_parent(self, parent_run_id: str | None) -> TrackingTarget:
        if not parent_run_id or parent_run_id == self.parent_run_id:
            return self
        return TrackingTarget(self.uri, self.experiment_id, parent_run_id)


def active_target() -> TrackingTarget | None:
    """The active MLflow run (kedro-mlflow's) as a target, or None when nothing tracks."""
    run = mlflow.active_run()
    if run is None:
        return None
    return TrackingTarget(mlflow.get_tracking_uri(), run.info.experiment_id, run.info.run_id)


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'training': {'optimizer': 'sgd'}} -> {'training.optimizer': 'sgd'}."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


class NullRun:
    """Stands in for a child run when nothing is tracked (tests, runs without MLflow)."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None: ...
    def log_history(self, history: Mapping[str, list[tuple[int, float]]]) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_figure(self, figure: Any, artifact_file: str) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class TrialRun(NullRun):
    """One trial's MLflow child run, written with an explicit run id."""

    def __init__(self, target: TrackingTarget, name: str, tags: Mapping[str, str]):
        self._client = MlflowClient(tracking_uri=target.uri)
        run = self._client.create_run(
            target.experiment_id, run_name=name,
            tags={PARENT_TAG: target.parent_run_id, **{k: str(v) for k, v in tags.items()}},
        )
        self.run_id = run.info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, _param_text(v)) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        self.log_history({k: [(step, v)] for k, v in metrics.items()})

    def log_history(self, history: Mapping[str, list[tuple[int, float]]]) -> None:
        now = int(time.time() * 1000)
        items = [Metric(_metric_key(name), float(v), now, int(step))
                 for name, points in history.items() for step, v in points
                 if v is not None and math.isfinite(float(v))]
        for start in range(0, len(items), 500):
            self._client.log_batch(self.run_id, metrics=items[start:start + 500])

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self.run_id, text, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            figure.savefig(path, dpi=100)
            parent = str(Path(artifact_file).parent)
            self._client.log_artifact(self.run_id, str(path), None if parent == "." else parent)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, str(value))

    def finish(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status=status)


def start_trial_run(target: TrackingTarget | None, name: str,
                    tags: Mapping[str, str]) -> NullRun:
    return NullRun() if target is None else TrialRun(target, name, tags)


def close_run(uri: str, run_id: str, status: str, tags: Mapping[str, str] | None = None) -> None:
    """Marks an earlier attempt's run as not counted, and ends it with ``status`` if it is
    still RUNNING (a killed worker's); a run that already ended keeps its status."""
    client = MlflowClient(tracking_uri=uri)
    try:
        for key, value in (tags or {}).items():
            client.set_tag(run_id, key, str(value))
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status=status)
    except Exception as exc:  # a run deleted by hand must not stop a study
        logger.warning("Could not close MLflow run %s: %s", run_id, exc)


def child_runs(uri: str, experiment_id: str, parent_run_id: str) -> list[Any]:
    """Every child run of a parent (all statuses)."""
    client = MlflowClient(tracking_uri=uri)
    return client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = "
                              f"'{parent_run_id}'", max_results=10000)


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:MAX_PARAM_LENGTH]


def _metric_key(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)
