"""Running trials with Optuna (a study's variants and repeats, a cross-validation's folds):
resumable, several worker processes, several machines.

Design (why Optuna and which storage):

* **Storage**: Optuna's RDB storage (SQLAlchemy): ``sqlite:///...`` on one machine, a
  PostgreSQL or MySQL URL beyond it, one code path for both. RDB is the storage with trial
  *heartbeats* (Optuna 5's journal storage has none): a worker records a heartbeat every
  ``heartbeat_seconds`` while it runs a trial, so a trial whose worker was killed (``kill -9``,
  a lost machine) is recognised as stale after twice that time, marked FAIL and re-queued
  (``RetryFailedTrialCallback``) instead of staying RUNNING for ever. SQLite is safe for a few
  processes on one machine: every write is a transaction under SQLite's file lock, Optuna takes
  a trial number and pops a waiting trial atomically, and a 60 s busy timeout makes a writer
  wait for the lock instead of failing; trials last minutes, so the lock is rarely contended.
  (SQLite must sit on a local disk; for several machines use a database server.)
* **Grid studies**: a trial is one (variant, repeat). ``GridSampler`` gives trial number ``k``
  grid point ``k`` for the first ``n`` trials, so concurrent workers cover the grid once. Near
  the end several workers could still ask for the last point; a callback stops a worker once
  every point is done or running, and the objective refuses (prunes before any training) a
  trial whose point an earlier trial already holds, so no point is trained twice and none is
  counted twice: the summary counts COMPLETE trials only, one per point.
* **Resume**: loading the study by name continues it. Stale trials are failed and re-queued;
  points whose trials all failed in an earlier session are queued again once; a worker then
  waits while other workers' trials are running, so it ends only when the study is complete.
* **Search**: TPE over the declared space, MedianPruner on per-epoch validation macro-F1 the
  trial function reports; ``n_trials`` counts complete and pruned trials across all workers.
* **Workers**: ``spawn``-ed processes (TensorFlow is not fork-safe, and threads share one
  interpreter), each loading the study from the storage and running ``study.optimize``.

The trial function is injected: ``fn(spec: TrialSpec, context: TrialContext) -> TrialOutcome``
(the project's Keras runner in production, a cheap fake in tests). It must be picklable
(a module-level function or an instance of a module-level class) to reach spawned workers.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from neuroblastoma_cnn.core.errors import ProjectError
from neuroblastoma_cnn.runtime.stopping import RunStopped
from neuroblastoma_cnn.tracking import interrupted

from . import child_runs
from .plan import StudyPlan
from .storage import (
    SCHEMA_RACE_ATTEMPTS,
    StaleTrialCallback,
    _redacted,
    load_existing,
    open_storage,
)
from .studies import (
    ATTR_DUPLICATE,
    ATTR_METRICS,
    ATTR_OVERRIDES,
    ATTR_RUN,
    ATTR_WORKER,
    LIVE,
    REPEAT,
    STUDY_EXPERIMENT,
    STUDY_HASH,
    STUDY_PARENT,
    STUDY_PLAN,
    VARIANT,
    check_complete,
    close_orphan_runs,
    completed_trials,
    create_or_load,
    describe_point,
    grid_points,
    make_pruner,
    make_sampler,
    optuna_study_name,
    point_of,
    require_mode,
    study_target,
    trial_rows,
    user_attrs,
)

logger = logging.getLogger(__name__)

#: Everything the pipelines and the tests reach through this module: the trial interface and
#: workers (here), the storage (``storage``) and the study's bookkeeping (``studies``).
__all__ = [
    "ATTR_DUPLICATE", "ATTR_METRICS", "ATTR_OVERRIDES", "ATTR_RUN", "ATTR_WORKER", "LIVE",
    "REPEAT", "SCHEMA_RACE_ATTEMPTS", "STUDY_EXPERIMENT", "STUDY_HASH", "STUDY_PARENT",
    "STUDY_PLAN", "VARIANT", "Objective", "StaleTrialCallback", "TrialContext", "TrialFunction",
    "TrialOutcome", "TrialSpec", "TrialSuperseded", "WorkerConfig", "_redacted",
    "check_complete", "close_orphan_runs", "completed_trials", "create_or_load",
    "describe_point", "grid_points", "load_existing", "make_pruner", "make_sampler",
    "open_storage", "optuna_study_name", "point_of", "remaining_work", "require_mode",
    "run_worker", "run_workers", "study_target", "suggest", "trial_rows", "user_attrs",
]


# --------------------------------------------------------------------- trial interface


@dataclass(frozen=True)
class TrialSpec:
    """What one trial runs: the variant's parameter overrides on one repeat."""

    study: str
    number: int
    variant: str
    repeat: int
    overrides: dict[str, Any]
    params: dict[str, Any]  # the model's parameters with fixed values and overrides applied


@dataclass
class TrialOutcome:
    """``objective``: what Optuna maximises (validation macro-F1 of the kept epoch; never the
    test score, so a search cannot select on the test set). ``metrics``: the test metrics the
    summary compares (``f1_macro``, ``accuracy``, ``f1_<class>``...)."""

    objective: float
    metrics: dict[str, float] = field(default_factory=dict)


class TrialContext:
    """Handed to the trial function: report per-epoch values (pruning) and the MLflow run."""

    def __init__(self, trial: optuna.Trial | None, prune: bool, run: child_runs.NullRun):
        self._trial = trial
        self._prune = prune
        self.run = run

    def report(self, step: int, value: float) -> None:
        """Records validation macro-F1 after epoch ``step``; raises ``optuna.TrialPruned``
        when the pruner judges the trial hopeless (search studies only)."""
        if self._trial is None:
            return
        self._trial.report(float(value), int(step))
        if self._prune and self._trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {step} (validation macro-F1 {value:.4f})")


TrialFunction = Callable[[TrialSpec, TrialContext], TrialOutcome]


class TrialSuperseded(RuntimeError):
    """A trial finished after another worker had already failed it as stale and queued it
    again (a heartbeat that came too late): its result is not recorded."""


# ---------------------------------------------------------------------------- objective


class Objective:
    """Optuna objective around the injected trial function: picks the point (grid) or samples
    the space (search), skips duplicates, and wraps the trial in its MLflow child run."""

    def __init__(self, plan: StudyPlan, trial_fn: TrialFunction,
                 target: child_runs.TrackingTarget | None, worker: str):
        self.plan = plan
        self.trial_fn = trial_fn
        self.target = target
        self.worker = worker

    def _spec(self, trial: optuna.Trial) -> TrialSpec:
        plan = self.plan
        if plan.mode == "grid":
            variant = str(trial.suggest_categorical(VARIANT, plan.variant_names))
            repeat = int(trial.suggest_categorical(REPEAT, list(range(plan.repeats))))
            overrides = dict(plan.variant(variant).set)
        else:
            variant, repeat = f"trial-{trial.number}", 0
            overrides = {path: suggest(trial, path, dim) for path, dim in plan.space.items()}
        return TrialSpec(plan.name, trial.number, variant, repeat, overrides,
                         plan.params_for(overrides))

    def _duplicate_of(self, trial: optuna.Trial, spec: TrialSpec) -> int | None:
        if self.plan.mode != "grid":
            return None
        for other in trial.study.get_trials(deepcopy=False, states=LIVE):
            if other.number < trial.number and point_of(other) == (spec.variant, spec.repeat):
                return other.number
        return None

    def _start_run(self, trial: optuna.Trial, spec: TrialSpec) -> child_runs.NullRun:
        """The trial's MLflow child run (a killed attempt's run is closed as not counted), with
        the worker, overrides and run id recorded on the trial."""
        previous_run = trial.user_attrs.get(ATTR_RUN)  # copied from a killed attempt
        if previous_run and self.target is not None:
            child_runs.close_run(self.target.uri, previous_run, "KILLED",
                               {"study.counted": "false", "study.retried_as": trial.number})
        trial.set_user_attr(ATTR_WORKER, self.worker)
        trial.set_user_attr(ATTR_OVERRIDES, spec.overrides)
        run = child_runs.start_trial_run(
            self.target, f"{spec.study} {spec.variant} r{spec.repeat}",
            {"study.name": spec.study, "study.optuna_study": trial.study.study_name,
             "study.variant": spec.variant,
             "study.repeat": spec.repeat, "study.trial": spec.number,
             "study.worker": self.worker},
        )
        trial.set_user_attr(ATTR_RUN, run.run_id)
        return run

    def __call__(self, trial: optuna.Trial) -> float:
        spec = self._spec(trial)
        earlier = self._duplicate_of(trial, spec)
        if earlier is not None:
            trial.set_user_attr(ATTR_DUPLICATE, earlier)
            raise optuna.TrialPruned(f"({spec.variant}, repeat {spec.repeat}) is trial "
                                     f"{earlier}'s; not run twice")
        run = self._start_run(trial, spec)
        logger.info("Trial %d: %s, repeat %d (%s)", spec.number, spec.variant, spec.repeat,
                    ", ".join(f"{k}={v}" for k, v in spec.overrides.items()) or "defaults")
        started = time.perf_counter()
        try:
            run.log_params({"study": {"name": spec.study, "variant": spec.variant,
                                      "repeat": spec.repeat, "trial": spec.number},
                            **spec.params})
            outcome = self.trial_fn(spec, TrialContext(trial, self.plan.mode == "search", run))
        except optuna.TrialPruned:
            run.set_tags({"study.state": "pruned"})
            run.finish("KILLED")
            raise
        except (RunStopped, KeyboardInterrupt) as exc:  # a signal stopped the whole run
            reason = f"stopped by {getattr(exc, 'signal_name', 'SIGINT')}"
            run.set_tags({"study.state": "stopped",
                          interrupted.KILLED_TAG: f"its parent run: {reason}"})
            run.finish("KILLED")
            raise
        except BaseException:
            run.set_tags({"study.state": "failed"})
            run.finish("FAILED")
            raise
        seconds = time.perf_counter() - started
        if trial.study._storage.get_trial(trial._trial_id).state != TrialState.RUNNING:
            # Another worker took this trial for a dead one (its heartbeat came too late) and
            # queued it again: this result is dropped, the retry's counts.
            run.set_tags({"study.state": "superseded", "study.counted": "false"})
            run.finish("KILLED")
            raise TrialSuperseded(f"Trial {spec.number} was marked failed by another worker "
                                  "while it ran; its retry counts instead")
        metrics = {k: float(v) for k, v in outcome.metrics.items()}
        trial.set_user_attr(ATTR_METRICS, metrics)
        trial.set_user_attr("seconds", seconds)
        run.log_metrics({**{f"test_{k}": v for k, v in metrics.items()},
                         "objective": float(outcome.objective), "trial_seconds": seconds})
        run.set_tags({"study.state": "complete"})
        run.finish("FINISHED")
        logger.info("Trial %d done in %.1fs: objective %.4f, test macro-F1 %s", spec.number,
                    seconds, outcome.objective, f"{metrics.get('f1_macro', float('nan')):.4f}")
        return float(outcome.objective)


def suggest(trial: optuna.Trial, name: str, dim: Any) -> Any:
    """One value of a search dimension (config.Dimension)."""
    if dim.type == "categorical":
        return trial.suggest_categorical(name, list(dim.choices))
    if dim.type == "int":
        return trial.suggest_int(name, int(dim.low), int(dim.high), log=dim.log,
                                 step=int(dim.step or 1))
    return trial.suggest_float(name, float(dim.low), float(dim.high), log=dim.log,
                               step=dim.step)


# ---------------------------------------------------------------------------- workers


@dataclass
class WorkerConfig:
    """Everything a worker process needs (picklable: it crosses the spawn boundary)."""

    plan: StudyPlan
    study_name: str
    trial_fn: TrialFunction
    target: child_runs.TrackingTarget | None = None
    poll_seconds: float | None = None  # None: the heartbeat interval

    @property
    def poll(self) -> float:
        return float(self.poll_seconds or self.plan.heartbeat_seconds)


class _StopWhenCovered:
    """Stops this worker's ``optimize`` when nothing is queued and every grid point is done or
    running (grid), or when enough trials are finished or running (search)."""

    def __init__(self, plan: StudyPlan):
        self.plan = plan

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if remaining_work(study, self.plan)["start"] == 0:
            study.stop()


def remaining_work(study: optuna.Study, plan: StudyPlan) -> dict[str, Any]:
    """What is left: ``start`` (trials still to start: queued or never run), ``running``,
    ``failed`` points (grid: all their trials failed, none queued or running)."""
    trials = study.get_trials(deepcopy=False)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    if plan.mode == "search":
        finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
        todo = max(0, int(plan.n_trials or 0) - finished - running - waiting)
        return {"start": waiting + todo, "running": running, "failed": []}
    held: dict[tuple[str, int], set[TrialState]] = {}
    for t in trials:
        point = point_of(t)
        if point is not None and ATTR_DUPLICATE not in t.user_attrs:
            held.setdefault(point, set()).add(t.state)
    points = grid_points(plan)
    never = [p for p in points if p not in held]
    failed = [p for p in points if p in held and not held[p] & set(LIVE)]
    return {"start": waiting + len(never), "running": running, "failed": failed}


def run_worker(config: WorkerConfig, worker: int = 0) -> int:
    """One worker: runs trials until the study is complete; returns how many it ran."""
    plan = config.plan
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what ran
    storage = open_storage(plan.storage, plan.heartbeat_seconds, plan.max_retries,
                           config.target.uri if config.target else None)
    study = optuna.load_study(study_name=config.study_name, storage=storage,
                              sampler=make_sampler(plan, worker), pruner=make_pruner(plan))
    label = f"{socket.gethostname()}:{os.getpid()}"
    objective = Objective(plan, config.trial_fn, study_target(study, config.target), label)
    ran = 0
    requeued: set[tuple[str, int]] = set()
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        left = remaining_work(study, plan)
        for point in left["failed"]:
            if point not in requeued:  # failed in an earlier session: give it one more run
                requeued.add(point)
                logger.info("Queueing (%s, repeat %d) again: its earlier trial failed.", *point)
                last = max((t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                            if point_of(t) == point), key=lambda t: t.number)
                # A copy of the failed trial (params, grid id), as Optuna's own retry makes it.
                optuna.storages.RetryFailedTrialCallback(max_retry=None)(study, last)
                left["start"] += 1
        if left["start"] > 0:
            before = len(study.get_trials(deepcopy=False))
            try:
                # No gc_after_trial: the trial function frees its own memory (the Keras
                # trial: clear_session, which collects); a second collection per trial only
                # costs time (0.4 s each with TensorFlow loaded).
                study.optimize(objective, callbacks=[_StopWhenCovered(plan)])
            except ValueError as exc:
                # Optuna refuses to record a trial another worker already failed as stale
                # (see TrialSuperseded): nothing is counted, the retry is queued; go on.
                if not str(exc).startswith("Cannot tell a FAIL trial"):
                    raise
                logger.warning("A trial of this worker was taken over as stale by another "
                               "worker (heartbeat too late: raise study.heartbeat_seconds on a "
                               "busy machine); its retry counts instead.")
            ran += len(study.get_trials(deepcopy=False)) - before
            continue
        if left["running"] > 0:
            logger.info("Waiting for %d trial(s) running elsewhere.", left["running"])
            time.sleep(config.poll)
            continue
        return ran


def _worker_entry(config: WorkerConfig, worker: int, log_level: int) -> None:
    """Spawned process entry point: own logging, one clear line for the project's errors."""
    logging.basicConfig(level=log_level,
                        format=f"%(asctime)s worker {worker} %(levelname)s %(name)s: %(message)s")
    try:
        run_worker(config, worker)
    except ProjectError as exc:
        logger.error("%s", exc.one_line())
        raise SystemExit(1) from None


def run_workers(config: WorkerConfig, workers: int) -> None:
    """Runs ``workers`` worker processes on the study (in this process when there is one)."""
    if workers <= 0:
        logger.info("study.workers is 0: no trials run here, only the summary.")
        return
    if workers == 1:
        run_worker(config, 0)
        return
    context = mp.get_context("spawn")
    level = logging.getLogger().getEffectiveLevel()
    processes = [context.Process(target=_worker_entry, args=(config, i, level),
                                 name=f"study-worker-{i}") for i in range(workers)]
    for p in processes:
        p.start()
    try:
        for p in processes:
            p.join()
    except BaseException:
        for p in processes:
            if p.is_alive():
                p.terminate()
        raise
    failed = [p.name for p in processes if p.exitcode != 0]
    if failed:
        raise ProjectError(f"Study worker(s) {', '.join(failed)} stopped with an error; the "
                           "trials they finished are kept.",
                           hint="see their log lines above, fix the cause and run the same "
                                "command again to resume")


# ---------------------------------------------------------------------------- results


