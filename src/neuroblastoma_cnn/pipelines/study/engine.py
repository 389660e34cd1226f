"""Running a study's trials with Optuna: resumable, several worker processes, several machines.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError

from neuroblastoma_cnn.core.errors import DataError, ParameterError, ProjectError

from . import tracking
from .config import StudyPlan

logger = logging.getLogger(__name__)

VARIANT, REPEAT = "variant", "repeat"
ATTR_METRICS = "metrics"
ATTR_RUN = "mlflow_run_id"
ATTR_DUPLICATE = "duplicate_of"
ATTR_WORKER = "worker"
ATTR_OVERRIDES = "overrides"
STUDY_PLAN = "plan"
STUDY_PARENT = "mlflow_parent_run_id"
STUDY_EXPERIMENT = "mlflow_experiment_id"
STUDY_HASH = "definition_hash"
LIVE = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)


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

    def __init__(self, trial: optuna.Trial | None, prune: bool, run: tracking.NullRun):
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


# --------------------------------------------------------------------------- storage


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite:")


def _redacted(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.rsplit("@", maxsplit=1)[-1] if "@" in url else url


#: Tries to open a storage whose tables another worker is creating at the same moment.
SCHEMA_RACE_ATTEMPTS = 5


def _schema_race(exc: Exception) -> bool:
    """Whether ``exc`` is what losing a race to create the storage's tables looks like."""
    text = str(exc).lower()
    return isinstance(exc, IntegrityError) or "already exists" in text or "locked" in text


def _rdb_storage(url: str, engine_kwargs: dict[str, Any], heartbeat_seconds: int,
                 stale_trial_callback: StaleTrialCallback) -> optuna.storages.RDBStorage:
    """Optuna's storage at ``url``. Workers opening a new storage together all create its
    tables and the losers fail (UNIQUE constraint, table exists, database locked): they try
    again, when the tables exist."""
    attempt = 1
    while True:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_seconds,
                    heartbeat_stale_trial_callback=stale_trial_callback)
        except (IntegrityError, OperationalError) as exc:
            if attempt == SCHEMA_RACE_ATTEMPTS or not _schema_race(exc):
                raise
            time.sleep(0.2 * attempt)
            attempt += 1


def open_storage(url: str, heartbeat_seconds: int, max_retries: int = 2,
                 tracking_uri: str | None = None) -> optuna.storages.RDBStorage:
    """The study storage at ``url``, with heartbeats and stale-trial retries.

    Raises DataError naming the (password-free) URL when it cannot be opened: a wrong URL,
    a missing driver, a server that does not answer, a folder that cannot be created.
    """
    engine_kwargs: dict[str, Any]
    if _is_sqlite(url):
        path = url.split(":///", 1)[-1] if ":///" in url else ""
        if path and path != ":memory:":
            try:
                Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DataError(f"Cannot create the folder of study storage '{url}': {exc}.",
                                hint="set study.storage to a writable path") from None
        engine_kwargs = {"connect_args": {"timeout": 60}}
    elif url.startswith(("postgresql", "mysql")):
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    try:
        return _rdb_storage(url, engine_kwargs, heartbeat_seconds,
                            StaleTrialCallback(max_retries, tracking_uri))
    except Exception as exc:  # SQLAlchemy, driver import and URL errors all mean 'unusable'
        reason = " ".join(str(exc).split())[:300]
        raise DataError(
            f"Cannot open the study storage '{_redacted(url)}': {type(exc).__name__}: {reason}",
            hint="study.storage must be a reachable database URL, e.g. sqlite:///data/optuna.db "
                 "or postgresql://user:password@host/db",
        ) from None


class StaleTrialCallback:
    """Runs when a trial's heartbeat went stale (its worker died): ends the trial's MLflow run
    as KILLED, then queues the same (variant, repeat) again, at most ``max_retries`` times."""

    def __init__(self, max_retries: int, tracking_uri: str | None):
        self.max_retries = max_retries
        self.tracking_uri = tracking_uri

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        logger.warning("Trial %d %s: its worker stopped (no heartbeat); it will run again.",
                       trial.number, describe_point(trial))
        run_id = trial.user_attrs.get(ATTR_RUN)
        if run_id and self.tracking_uri:
            tracking.close_run(self.tracking_uri, run_id, "KILLED",
                               {"study.counted": "false", "study.reason": "worker stopped"})
        optuna.storages.RetryFailedTrialCallback(max_retry=self.max_retries)(study, trial)


# ---------------------------------------------------------------------------- studies


def optuna_study_name(plan: StudyPlan, data_fingerprint: str) -> str:
    """``<study>-<hash>``: the same definition on the same data resumes the same Optuna study;
    a changed definition or new data starts a new one instead of mixing results."""
    return f"{plan.name}-{plan.definition_hash(data_fingerprint)}"


def grid_points(plan: StudyPlan) -> list[tuple[str, int]]:
    return [(v, r) for v in plan.variant_names for r in range(plan.repeats)]


def make_sampler(plan: StudyPlan, worker: int = 0) -> optuna.samplers.BaseSampler:
    if plan.mode == "grid":
        space = {VARIANT: plan.variant_names, REPEAT: list(range(plan.repeats))}
        return optuna.samplers.GridSampler(space, seed=plan.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # constant_liar: running trials count as mediocre, so parallel workers spread out.
        return optuna.samplers.TPESampler(seed=plan.seed + worker, constant_liar=True)


def make_pruner(plan: StudyPlan) -> optuna.pruners.BasePruner:
    if plan.mode == "grid" or plan.pruner is None:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=plan.pruner.n_startup_trials,
                                       n_warmup_steps=plan.pruner.n_warmup_steps)


def create_or_load(plan: StudyPlan, storage: optuna.storages.BaseStorage, study_name: str,
                   target: tracking.TrackingTarget | None = None) -> optuna.Study:
    """Creates the Optuna study or loads it (resume, another worker); records the plan and, the
    first time, the MLflow parent run that the trials' child runs nest under."""
    study = optuna.create_study(storage=storage, study_name=study_name, direction="maximize",
                                sampler=make_sampler(plan), pruner=make_pruner(plan),
                                load_if_exists=True)
    attrs = study.user_attrs
    if STUDY_PLAN not in attrs:
        study.set_user_attr(STUDY_PLAN, plan.model_dump(mode="json"))
        study.set_user_attr(STUDY_HASH, study_name.rsplit("-", 1)[-1])
    if target is not None and STUDY_PARENT not in attrs:
        study.set_user_attr(STUDY_PARENT, target.parent_run_id)
        study.set_user_attr(STUDY_EXPERIMENT, target.experiment_id)
    return study


def study_target(study: optuna.Study, target: tracking.TrackingTarget | None
                 ) -> tracking.TrackingTarget | None:
    """Where this study's child runs go: under the parent run recorded when it was created."""
    if target is None:
        return None
    attrs = study.user_attrs
    parent = attrs.get(STUDY_PARENT)
    experiment = attrs.get(STUDY_EXPERIMENT, target.experiment_id)
    if parent is None:
        return target
    return tracking.TrackingTarget(target.uri, str(experiment), str(parent))


def point_of(trial: FrozenTrial) -> tuple[str, int] | None:
    """The (variant, repeat) of a grid trial, also for a queued trial not started yet."""
    params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
    if VARIANT in params and REPEAT in params:
        return str(params[VARIANT]), int(params[REPEAT])
    return None


def describe_point(trial: FrozenTrial) -> str:
    point = point_of(trial)
    return f"({point[0]}, repeat {point[1]})" if point else str(trial.params)


# ---------------------------------------------------------------------------- objective


class Objective:
    """Optuna objective around the injected trial function: picks the point (grid) or samples
    the space (search), skips duplicates, and wraps the trial in its MLflow child run."""

    def __init__(self, plan: StudyPlan, trial_fn: TrialFunction,
                 target: tracking.TrackingTarget | None, worker: str):
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

    def __call__(self, trial: optuna.Trial) -> float:
        spec = self._spec(trial)
        earlier = self._duplicate_of(trial, spec)
        if earlier is not None:
            trial.set_user_attr(ATTR_DUPLICATE, earlier)
            raise optuna.TrialPruned(f"({spec.variant}, repeat {spec.repeat}) is trial "
                                     f"{earlier}'s; not run twice")
        previous_run = trial.user_attrs.get(ATTR_RUN)  # copied from a killed attempt
        if previous_run and self.target is not None:
            tracking.close_run(self.target.uri, previous_run, "KILLED",
                               {"study.counted": "false", "study.retried_as": trial.number})
        trial.set_user_attr(ATTR_WORKER, self.worker)
        trial.set_user_attr(ATTR_OVERRIDES, spec.overrides)
        run = tracking.start_trial_run(
            self.target, f"{spec.study} {spec.variant} r{spec.repeat}",
            {"study.name": spec.study, "study.optuna_study": trial.study.study_name,
             "study.variant": spec.variant,
             "study.repeat": spec.repeat, "study.trial": spec.number,
             "study.worker": self.worker},
        )
        trial.set_user_attr(ATTR_RUN, run.run_id)
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
    target: tracking.TrackingTarget | None = None
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
                study.optimize(objective, callbacks=[_StopWhenCovered(plan)],
                               gc_after_trial=True)
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


def completed_trials(study: optuna.Study, plan: StudyPlan) -> list[FrozenTrial]:
    """COMPLETE trials, one per grid point (the earliest, should two ever complete)."""
    seen: set[Any] = set()
    out = []
    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                    key=lambda t: t.number):
        key = point_of(t) if plan.mode == "grid" else t.number
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def trial_rows(study: optuna.Study, plan: StudyPlan) -> list[dict[str, Any]]:
    """Every trial of the study as a row (all states), for the trials table."""
    counted = {t.number for t in completed_trials(study, plan)}
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        point = point_of(t)
        row: dict[str, Any] = {
            "study": plan.name,
            "trial": t.number,
            "state": t.state.name,
            "counted": t.number in counted,
            "variant": point[0] if point else f"trial-{t.number}",
            "repeat": point[1] if point else 0,
            "objective": t.value if t.state == TrialState.COMPLETE else float("nan"),
            "seconds": t.user_attrs.get("seconds", float("nan")),
            "mlflow_run_id": t.user_attrs.get(ATTR_RUN),
            "worker": t.user_attrs.get(ATTR_WORKER),
            "retry_of": t.system_attrs.get("failed_trial"),
            "duplicate_of": t.user_attrs.get(ATTR_DUPLICATE),
            "epochs_reported": len(t.intermediate_values),
        }
        if plan.mode == "search":
            row.update({path: t.params.get(path) for path in plan.space})
        row.update(t.user_attrs.get(ATTR_METRICS, {}))
        rows.append(row)
    return rows


def close_orphan_runs(study: optuna.Study, target: tracking.TrackingTarget) -> int:
    """Ends the child runs a killed worker left RUNNING (also one killed before it could record
    its run id in the trial): found by their tags, matched to the trial they belong to."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    closed = 0
    for run in tracking.child_runs(target.uri, target.experiment_id, target.parent_run_id):
        tags = run.data.tags
        if run.info.status != "RUNNING" or tags.get("study.optuna_study") != study.study_name:
            continue
        trial = trials.get(int(tags.get("study.trial", -1)))
        if trial is not None and trial.state in (TrialState.RUNNING, TrialState.WAITING):
            continue  # still running somewhere
        if trial is not None and trial.state == TrialState.COMPLETE and \
                trial.user_attrs.get(ATTR_RUN) == run.info.run_id:
            tracking.close_run(target.uri, run.info.run_id, "FINISHED")  # killed after its tell
        else:
            tracking.close_run(target.uri, run.info.run_id, "KILLED", {"study.counted": "false"})
        closed += 1
    return closed


def check_complete(study: optuna.Study, plan: StudyPlan) -> None:
    """Fails when a grid point has no completed trial (the summary would not be paired)."""
    if plan.mode != "grid":
        return
    done = {point_of(t) for t in completed_trials(study, plan)}
    missing = [p for p in grid_points(plan) if p not in done]
    if missing:
        shown = ", ".join(f"({v}, repeat {r})" for v, r in missing[:5])
        raise DataError(f"Study '{plan.name}' is not complete: {len(missing)} trial(s) have no "
                        f"result, e.g. {shown}.",
                        hint="run the same command again (study.workers >= 1) to finish it")


def require_mode(plan: StudyPlan, modes: Sequence[str]) -> None:
    if plan.mode not in modes:
        raise ParameterError(f"Study '{plan.name}' has mode '{plan.mode}'; expected one of "
                             f"{', '.join(modes)}.")


def load_existing(plan: StudyPlan, study_name: str) -> optuna.Study:
    """The study from its storage, for reading only (summary)."""
    storage = open_storage(plan.storage, plan.heartbeat_seconds, plan.max_retries)
    try:
        return optuna.load_study(study_name=study_name, storage=storage,
                                 sampler=make_sampler(plan), pruner=make_pruner(plan))
    except KeyError:
        raise DataError(f"The storage holds no study '{study_name}'.",
                        hint="run the study with study.workers >= 1 first") from None


def user_attrs(study: optuna.Study) -> Mapping[str, Any]:
    return study.user_attrs
