"""Study nodes: resolve and check the study, run its trials, summarise them.

``prepare_study`` needs parameters only, so every configuration mistake (an unknown study, a
path the model lacks, a value the model refuses, an unreachable storage) stops the run before
any data is read or any model trained. ``run_study_trials`` then runs the trials with Optuna
(see ``trials/engine.py``) and returns the trials table; ``summarize_study`` turns it into the
report.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import mlflow
import pandas as pd
from matplotlib.figure import Figure

from neuroblastoma_cnn.core.errors import ParameterError
from neuroblastoma_cnn.datasets.tile_store import TileStore
from neuroblastoma_cnn.params import EvaluationParams
from neuroblastoma_cnn.trials import child_runs, engine
from neuroblastoma_cnn.trials import statistics as st
from neuroblastoma_cnn.trials.plan import StudyPlan
from neuroblastoma_cnn.trials.repeats import check_repeats
from neuroblastoma_cnn.trials.trial import KerasTrial, ProjectSteps, parse_trial_params

from . import results
from .config import resolve_study

logger = logging.getLogger(__name__)


def prepare_study(study: dict[str, Any], **models: dict[str, Any]) -> StudyPlan:
    """The study named by ``study.name``, resolved against its model's parameters (``models``:
    each model's block, ``params:<model>``); every variant's parameters (or, for a search, the
    ends of every range and every choice) are validated as the training node's own, and the
    storage is opened once."""
    plan = resolve_study(study, models)
    for label, overrides in _parameter_cases(plan):
        try:
            parse_trial_params(plan.params_for(overrides), plan.model, 0)
        except ParameterError as exc:
            raise ParameterError(f"study.studies.{plan.name} ({label}): {exc}") from None
    engine.open_storage(plan.storage, plan.heartbeat_seconds, plan.max_retries)
    logger.info("Study '%s' (%s, model %s): %s", plan.name, plan.mode, plan.model,
                f"{len(plan.variants)} variant(s) x {plan.repeats} repeat(s)"
                if plan.mode == "grid" else f"{plan.n_trials} trials")
    return plan


def _parameter_cases(plan: StudyPlan) -> list[tuple[str, dict[str, Any]]]:
    if plan.mode == "grid":
        return [(f"variant {v.name}", dict(v.set)) for v in plan.variants]
    cases = []
    for path, dim in plan.space.items():
        values = dim.choices if dim.type == "categorical" else [dim.low, dim.high]
        for value in values:
            cast = int(value) if dim.type == "int" else value
            cases.append((f"{path} = {cast}", {path: cast}))
    return cases


def data_fingerprint(split_table: pd.DataFrame, tiles: TileStore,
                     augmented: TileStore, evaluation: EvaluationParams) -> str:
    """What the trials' data is, independent of where it is stored: the same data on another
    machine gives the same fingerprint, so its workers join the same Optuna study."""
    digest = hashlib.sha256()
    for frame in (split_table, tiles.index, augmented.index):
        digest.update(frame.to_csv(index=False).encode())
    digest.update(repr(sorted(tiles.producer_metadata.items(), key=str)).encode())
    digest.update(evaluation.model_dump_json().encode())
    return digest.hexdigest()


def run_study_trials(
    plan: StudyPlan,
    augmented_train_tiles: TileStore,
    tiles: TileStore,
    split_table: pd.DataFrame,
    evaluation: EvaluationParams,
    steps: ProjectSteps,
) -> pd.DataFrame:
    """Creates or resumes the study, runs ``study.workers`` workers until every trial is done
    (or only reads the storage when ``workers`` is 0) and returns the trials table."""
    if plan.mode == "grid":
        check_repeats(split_table, plan.repeat_scheme, plan.repeats)
    name = engine.optuna_study_name(
        plan, data_fingerprint(split_table, tiles, augmented_train_tiles, evaluation))
    active = child_runs.active_target()
    storage = engine.open_storage(plan.storage, plan.heartbeat_seconds, plan.max_retries,
                                  active.uri if active else None)
    study = engine.create_or_load(plan, storage, name, active)
    target = engine.study_target(study, active)
    if active is not None:
        mlflow.set_tags({"study.name": plan.name, "study.optuna_study": name,
                         "study.parent_run_id": target.parent_run_id if target else ""})
    logger.info("Optuna study '%s' in %s (%d trial(s) so far)", name,
                engine._redacted(plan.storage), len(study.trials))
    trial_fn = KerasTrial(steps, plan.model, str(augmented_train_tiles.path), str(tiles.path),
                          split_table, evaluation, plan.repeat_scheme, plan.seed,
                          plan.validation_fraction)
    engine.run_workers(engine.WorkerConfig(plan, name, trial_fn, target), plan.workers)
    engine.check_complete(study, plan)
    if target is not None:
        closed = engine.close_orphan_runs(study, target)
        if closed:
            logger.info("Closed %d MLflow child run(s) left open by stopped workers.", closed)
    rows = engine.trial_rows(study, plan)
    if not rows:
        raise ParameterError(f"Study '{plan.name}' has no trials yet.",
                             hint="run it with study.workers >= 1")
    frame = pd.DataFrame(rows)
    frame.insert(1, "optuna_study", name)
    return frame


def summarize_study(study_trials: pd.DataFrame, plan: StudyPlan
                    ) -> tuple[pd.DataFrame, str, Figure, str]:
    """The summary table, its Markdown report, the macro-F1 plot and the best parameters."""
    summary = results.summarize(study_trials, plan)
    optuna_name = str(study_trials["optuna_study"].iloc[0])
    report = results.summary_text(study_trials, summary, plan, optuna_name)
    done = results.counted(study_trials)
    if plan.mode == "grid":
        figure = st.plot_variants(done, results.METRIC, order=plan.variant_names,
                                  baseline=plan.baseline, title=f"Study {plan.name}")
    else:
        figure = st.plot_variants(done.assign(variant="search", repeat=done["trial"]),
                                  results.METRIC, title=f"Study {plan.name}: complete trials")
    best, why = results.best_overrides(study_trials, summary, plan)
    if plan.mode == "grid":
        for row in summary.to_dict("records"):
            logger.info("Study '%s' %s: test macro-F1 %.3f ± %.3f over %d repeat(s)%s", plan.name,
                        row["variant"], row["mean"], row["sd"], row["n"],
                        "" if row["baseline"] else f", {row['mean_diff']:+.3f} vs baseline "
                        f"(Wilcoxon p {row['p_value']:.3f})")
    logger.info("Study '%s' best parameters: %s", plan.name, why)
    return summary, report, figure, results.best_parameters_yaml(plan, best, why)
