"""A study in Optuna's storage: its name, sampler and pruner, the grid point of each trial,
and the finished trials read back as rows.

Kept apart from ``engine.py``: what the engine, the summary and the CLI read from a study is
plain bookkeeping over Optuna's records, independent of the worker processes that fill it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from neuroblastoma_cnn.core.errors import DataError, ParameterError

from . import child_runs
from .plan import StudyPlan

#: Logged under the engine's name: one logger for the trials engine's lines.
logger = logging.getLogger("neuroblastoma_cnn.trials.engine")

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
                   target: child_runs.TrackingTarget | None = None) -> optuna.Study:
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


def study_target(study: optuna.Study, target: child_runs.TrackingTarget | None
                 ) -> child_runs.TrackingTarget | None:
    """Where this study's child runs go: under the parent run recorded when it was created."""
    if target is None:
        return None
    attrs = study.user_attrs
    parent = attrs.get(STUDY_PARENT)
    experiment = attrs.get(STUDY_EXPERIMENT, target.experiment_id)
    if parent is None:
        return target
    return child_runs.TrackingTarget(target.uri, str(experiment), str(parent))


def point_of(trial: FrozenTrial) -> tuple[str, int] | None:
    """The (variant, repeat) of a grid trial, also for a queued trial not started yet."""
    params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
    if VARIANT in params and REPEAT in params:
        return str(params[VARIANT]), int(params[REPEAT])
    return None


def describe_point(trial: FrozenTrial) -> str:
    point = point_of(trial)
    return f"({point[0]}, repeat {point[1]})" if point else str(trial.params)


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


def close_orphan_runs(study: optuna.Study, target: child_runs.TrackingTarget) -> int:
    """Ends the child runs a killed worker left RUNNING (also one killed before it could record
    its run id in the trial): found by their tags, matched to the trial they belong to."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    closed = 0
    for run in child_runs.child_runs(target.uri, target.experiment_id, target.parent_run_id):
        tags = run.data.tags
        if run.info.status != "RUNNING" or tags.get("study.optuna_study") != study.study_name:
            continue
        trial = trials.get(int(tags.get("study.trial", -1)))
        if trial is not None and trial.state in (TrialState.RUNNING, TrialState.WAITING):
            continue  # still running somewhere
        if trial is not None and trial.state == TrialState.COMPLETE and \
                trial.user_attrs.get(ATTR_RUN) == run.info.run_id:
            child_runs.close_run(target.uri, run.info.run_id, "FINISHED")  # killed after its tell
        else:
            child_runs.close_run(target.uri, run.info.run_id, "KILLED", {"study.counted": "false"})
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


def user_attrs(study: optuna.Study) -> Mapping[str, Any]:
    return study.user_attrs
