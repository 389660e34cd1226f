"""Cross-validation nodes: assign folds, run the folds, the floor on the same folds, the ensemble.

Why cross-validation: on a few dozen patients one split's test score moves by 0.1-0.2 with the
seed and with which patients happen to be tested (README "Cross-validation"), so a single
figure cannot tell two models apart. K folds score every image once, out of fold, and give the
spread over folds; the classical floor runs on the very same folds, so each CNN is compared
with it fold by fold (paired). The folds run as trials of the trials engine (resumable, several
workers, MLflow child runs); the fold models together make the fold ensemble.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from neuroblastoma_cnn.analysis.predictions import probability_column
from neuroblastoma_cnn.core.errors import ParameterError
from neuroblastoma_cnn.datasets.tile_store import TileStore
from neuroblastoma_cnn.params import CrossValidationParams, EvaluationParams
from neuroblastoma_cnn.trials import child_runs, engine
from neuroblastoma_cnn.trials.plan import StudyPlan, Variant
from neuroblastoma_cnn.trials.trial import ProjectSteps, parse_trial_params

from .fold_trial import FoldTrial, load_fold_model, read_fold
from .folds import CV, OUTER, assign_folds, check_folds

logger = logging.getLogger(__name__)

#: Which part of the data a prediction row scores.
HELD_OUT_SET, OUTER_SET = "held_out", "outer"
PREDICTION_KEYS = ["model", "fold", "set", "image_path", "label", "group"]


def assign_cv_folds(split_table: pd.DataFrame, params: CrossValidationParams) -> pd.DataFrame:
    """The fold of every image (versioned: ``cv_folds``); fails before any training when a
    class has fewer patient groups than folds."""
    folds = assign_folds(split_table, params.n_folds, params.seed, params.outer_test)
    check_folds(folds, params.n_folds)
    return folds


def cv_plan(model: str, model_params: dict[str, Any], training_params: dict[str, Any],
            params: CrossValidationParams) -> StudyPlan:
    """The folds as a grid study of one variant and K repeats (repeat = fold); the model's
    parameters are validated here, before any data is read."""
    block = {"model": dict(model_params), "training": dict(training_params)}
    _, training = parse_trial_params(block, model, 0)
    if training.stain_normalisation is not None:
        # Each fold would fit its own stain reference from its own training tiles, so the
        # fold models would need different preprocessing and could not form one ensemble.
        raise ParameterError(
            f"{model}.training.stain_normalisation = {training.stain_normalisation}: each fold "
            "would fit its own stain reference, and fold models preprocessed differently "
            "cannot form one ensemble.",
            hint=f"set {model}.training.stain_normalisation: null for cross-validation")
    return StudyPlan(
        name=f"cross_validation-{model}", mode="grid", model=model, repeats=params.n_folds,
        repeat_scheme="folds", seed=params.seed, validation_fraction=params.validation_fraction,
        storage=params.storage, workers=params.workers,
        heartbeat_seconds=params.heartbeat_seconds, max_retries=params.max_retries,
        base_params=block, fixed={}, variants=[Variant(name="cv", set={})], baseline=None,
        space={}, n_trials=None, pruner=None)


def _fingerprint(*frames: pd.DataFrame, extra: str = "") -> str:
    digest = hashlib.sha256()
    for frame in frames:
        digest.update(frame.to_csv(index=False).encode())
    digest.update(extra.encode())
    return digest.hexdigest()


def folds_root(models_dir: str | Path, model: str, study_name: str) -> Path:
    """Where the folds of one cross-validation keep their models and predictions."""
    return Path(models_dir) / model / "cross_validation" / study_name


def run_cv_folds(
    model: str,
    model_params: dict[str, Any],
    training_params: dict[str, Any],
    tiles: TileStore,
    split_table: pd.DataFrame,
    cv_folds: pd.DataFrame,
    evaluation: EvaluationParams,
    params: CrossValidationParams,
    steps: ProjectSteps,
    models_dir: str | Path = "data/06_models",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Trains the folds that are not done yet (all of them on a first run) and returns the
    folds table (one row per fold) and every fold's image predictions (out of fold, and on the
    outer test patients)."""
    plan = cv_plan(model, model_params, training_params, params)
    name = engine.optuna_study_name(plan, _fingerprint(
        split_table, tiles.index, cv_folds,
        extra=repr(sorted(tiles.producer_metadata.items(), key=str))
        + evaluation.model_dump_json() + str(params.log_fold_models)))
    active = child_runs.active_target()
    storage = engine.open_storage(plan.storage, plan.heartbeat_seconds, plan.max_retries,
                                  active.uri if active else None)
    study = engine.create_or_load(plan, storage, name, active)
    target = engine.study_target(study, active)
    if active is not None:  # a resumed run: its folds nest under the run that started them
        mlflow.set_tags({f"{model}.cv.optuna_study": name,
                         f"{model}.cv.folds_parent_run_id": target.parent_run_id})
    root = folds_root(models_dir, model, name)
    done = len(engine.completed_trials(study, plan))
    logger.info("Cross-validation of %s: %d of %d folds done (Optuna study '%s'; fold models "
                "in %s)", model, done, plan.repeats, name, root)
    trial_fn = FoldTrial(steps, model, str(tiles.path), str(tiles.path), split_table,
                         evaluation, "folds", params.seed, params.validation_fraction,
                         folds=cv_folds, root=str(root), log_model=params.log_fold_models)
    engine.run_workers(engine.WorkerConfig(plan, name, trial_fn, target), plan.workers)
    engine.check_complete(study, plan)
    if target is not None:
        engine.close_orphan_runs(study, target)
    trials = _fold_rows(study, plan, root)
    return trials, _fold_predictions(root, trials, model)


def _fold_rows(study: Any, plan: StudyPlan, root: Path) -> pd.DataFrame:
    rows = []
    for trial in engine.completed_trials(study, plan):
        fold = engine.point_of(trial)[1]
        summary = read_fold(root, fold)["summary"]
        rows.append({"fold": fold, "trial": trial.number, "optuna_study": study.study_name,
                     "val_macro_f1": summary["val_best"], "f1_macro": summary["f1_macro"],
                     "accuracy": summary["accuracy"], "seconds": summary["seconds"],
                     "diverged_tiles": summary["diverged_tiles"],
                     "mlflow_run_id": trial.user_attrs.get(engine.ATTR_RUN),
                     "fold_dir": str(root / f"fold_{fold}")})
    return pd.DataFrame(rows).sort_values("fold", ignore_index=True)


def _fold_predictions(root: Path, trials: pd.DataFrame, model: str) -> pd.DataFrame:
    parts = []
    for fold in trials["fold"]:
        result = read_fold(root, int(fold))
        parts.append(result["held_out"].assign(model=model, fold=int(fold), set=HELD_OUT_SET))
        if result["outer"] is not None:
            parts.append(result["outer"].assign(model=model, fold=int(fold), set=OUTER_SET))
    frame = pd.concat(parts, ignore_index=True)
    rest = [c for c in frame.columns if c not in PREDICTION_KEYS]
    return frame[PREDICTION_KEYS + rest]


def cross_validate_floor(cv_folds: pd.DataFrame, raw_images: Path,
                         params: CrossValidationParams) -> pd.DataFrame:
    """The classical floor on the same folds: per fold, fitted on the other folds' images
    (C and gamma from grouped inner folds) and scored on the held-out fold and the outer
    patients. Empty when ``floor.enabled`` is false."""
    from neuroblastoma_cnn.models.classical import (  # noqa: PLC0415  (scikit-learn, lazily)
        ColourTextureSVM,
        describe_images,
    )

    floor = params.floor
    if not floor.enabled:
        return pd.DataFrame(columns=PREDICTION_KEYS)
    root = Path(raw_images)
    features = describe_images([root / p for p in cv_folds["image_path"]], floor.downscale)
    labels = cv_folds["label"].astype(str).to_numpy()
    groups = cv_folds["group"].astype(str).to_numpy()
    classes = sorted(set(labels))
    is_cv = (cv_folds["role"] == CV).to_numpy()
    parts = []
    for fold in range(params.n_folds):
        train = is_cv & (cv_folds["fold"] != fold).to_numpy()
        svm = ColourTextureSVM(floor.c_grid, floor.gamma_factors, floor.inner_folds,
                               floor.calibration, seed=params.seed + fold)
        svm.fit(features[train], labels[train], groups[train])
        logger.info("Floor fold %d: C %s, gamma factor %s", fold, svm.best_params_.get("C"),
                    svm.best_params_.get("gamma_factor", svm.best_params_.get("gamma")))
        for name, rows in ((HELD_OUT_SET, is_cv & (cv_folds["fold"] == fold).to_numpy()),
                           (OUTER_SET, (cv_folds["role"] == OUTER).to_numpy())):
            if rows.any():
                parts.append(_floor_rows(cv_folds[rows], svm, features[rows], classes, fold,
                                         name))
    frame = pd.concat(parts, ignore_index=True)
    rest = [c for c in frame.columns if c not in PREDICTION_KEYS]
    return frame[PREDICTION_KEYS + rest]


def _floor_rows(images: pd.DataFrame, svm: Any, features: np.ndarray, classes: list[str],
                fold: int, name: str) -> pd.DataFrame:
    prob = svm.probabilities_over(features, classes)
    out = images[["image_path", "label", "group"]].reset_index(drop=True).assign(
        model="floor", fold=fold, set=name)
    for i, c in enumerate(classes):
        out[probability_column(c)] = prob[:, i]
    out["predicted"] = [classes[i] for i in prob.argmax(axis=1)]
    return out


def build_cv_ensemble(cv_trials: pd.DataFrame, params: CrossValidationParams) -> Any:
    """The fold models as one model: the (weighted) mean of their probabilities, with their
    common preprocessing record (members whose records differ are refused)."""
    from neuroblastoma_cnn.models.ensemble import build_ensemble  # noqa: PLC0415  (Keras)

    members, sources = [], []
    for row in cv_trials.sort_values("fold").itertuples():
        folder = Path(row.fold_dir)
        members.append(load_fold_model(folder.parent, int(row.fold)))
        sources.append(str(folder / "model.keras"))
    weights = (None if params.ensemble.weights == "equal"
               else cv_trials.sort_values("fold")["val_macro_f1"].clip(lower=1e-6).tolist())
    logger.info("Fold ensemble of %d models (%s weights)", len(members), params.ensemble.weights)
    return build_ensemble(members, weights=weights, sources=sources)

