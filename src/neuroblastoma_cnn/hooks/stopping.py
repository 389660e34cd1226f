"""Runs that end truthfully: a ``kedro run`` stopped by SIGINT or SIGTERM ends its MLflow run
(and its children) KILLED with the stage it reached; each run records the process that owns
it, and runs left RUNNING by a process that is gone (SIGKILL, power cut) are marked KILLED when
the next run starts on that host (``runtime.stopping``, ``tracking.interrupted``)."""

from __future__ import annotations

import logging
from typing import Any

import mlflow
from kedro.framework.hooks import hook_impl

from neuroblastoma_cnn.runtime import stopping
from neuroblastoma_cnn.tracking import interrupted

logger = logging.getLogger(__name__)


class RunStopHook:
    """Installs the stop signals for the length of a pipeline run, tags the run's owner, marks
    orphaned runs, and ends a stopped run KILLED."""

    def __init__(self) -> None:
        self._run_id: str | None = None

    @hook_impl(trylast=True)  # after kedro-mlflow has opened the run
    def before_pipeline_run(self) -> None:
        stopping.install()
        stopping.set_stage("the start of the run (before its first node)")
        run = mlflow.active_run()
        self._run_id = run.info.run_id if run is not None else None
        if run is None:
            return
        mlflow.set_tags(interrupted.process_tags())
        try:
            interrupted.mark_orphans(mlflow.MlflowClient(), [run.info.experiment_id],
                                     run.info.run_id)
        except Exception as exc:  # a store that cannot search: the run itself goes on
            logger.warning("Runs left RUNNING by stopped processes were not checked: %s", exc)

    @hook_impl(tryfirst=True)
    def before_node_run(self, node: Any) -> None:
        stopping.set_stage(f"node '{node.name}'")

    @hook_impl(trylast=True)  # kedro-mlflow has closed the finished run
    def after_pipeline_run(self) -> None:
        stopping.uninstall()

    @hook_impl(trylast=True)  # after kedro-mlflow has ended the run FAILED
    def on_pipeline_error(self, error: Exception) -> None:
        stopping.uninstall()
        stop = stopping.stop_of(error)
        if stop is None or self._run_id is None:
            return
        ended = interrupted.mark_killed(mlflow.MlflowClient(), self._run_id,
                                        f"stopped by {stop.signal_name}", stop.stage)
        logger.warning("Run stopped by %s during %s: MLflow run%s %s marked KILLED",
                       stop.signal_name, stop.stage, "s" if len(ended) > 1 else "",
                       ", ".join(ended))

