"""scikit-learn heads on CNN features: the estimators, their grids and grouped cross-validation.

Pure scikit-learn and NumPy: nothing here knows Kedro, Keras or MLflow.

Decisions (the parameters live in conf/base/parameters_features.yml):

- Every head is ``Pipeline([("scale", StandardScaler()), ("clf", <classifier>)])``: features are
  standardised inside the pipeline, so each cross-validation fold scales on its own training
  part and a saved head carries its scaler.
- Cross-validation folds are patient groups, never tiles: tiles of one patient look alike, and a
  fold that splits a patient would reward memorising it. The folds are built once
  (:func:`group_folds`) as explicit index pairs and used both by the hyperparameter search and
  by the calibration, so the two cannot disagree.
- Probabilities: a classifier without ``predict_proba`` of its own (the RBF SVM) is calibrated
  with ``CalibratedClassifierCV`` on the same grouped folds (``ensemble=False``: one SVM refitted
  on all fitting tiles, one sigmoid fitted on its out-of-fold decision values). ``SVC(probability=
  True)`` is refused because its internal Platt scaling cross-validates over tiles, which mixes
  patients. Decision trees, logistic regression and gradient boosting keep their own
  probabilities: a tree's leaf frequencies are the class shares of the training tiles in that
  leaf, a true (if coarse) estimate; the tree's depth and leaf size are chosen on grouped folds,
  and averaging the tiles of an image smooths the leaves' steps. ``calibration`` can still be set
  for any head.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier

from neuroblastoma_cnn.core.errors import DataError, ParameterError
from neuroblastoma_cnn.core.group_folds import Folds, check_group_folds, stratified_group_folds

from .params import CvParams, HeadParams, HeadsParams

logger = logging.getLogger(__name__)

ESTIMATORS: dict[str, type] = {
    "svc": SVC,
    "decision_tree": DecisionTreeClassifier,
    "logistic_regression": LogisticRegression,
    "hist_gradient_boosting": HistGradientBoostingClassifier,
}
CLF_STEP = "clf"


# --------------------------------------------------------------------------------- parameters


def as_heads_params(params: HeadsParams | Mapping[str, Any]) -> HeadsParams:
    """Kedro hands nodes the validated model; direct callers (tests, CLI) may pass a dict."""
    if isinstance(params, HeadsParams):
        return params
    return HeadsParams.parse(dict(params), "features.heads")


# ---------------------------------------------------------------------------------- estimators


def make_head(name: str, head: HeadParams) -> tuple[Pipeline, dict[str, list[Any]]]:
    """The unfitted ``Pipeline(scale, clf)`` of a head and its grid in pipeline notation."""
    cls = ESTIMATORS[head.estimator]
    fixed = dict(head.params)
    if head.estimator == "svc" and fixed.get("probability"):
        raise ParameterError(
            f"features.heads.classifiers.{name}: SVC(probability=True) calibrates with its own "
            "5-fold CV over tiles, which mixes patients.",
            hint="remove 'probability' and set 'calibration: sigmoid' (grouped folds)",
        )
    try:
        clf = cls(**fixed)
        clf.set_params(**{k: v[0] for k, v in head.grid.items() if v})
    except (TypeError, ValueError) as exc:
        raise ParameterError(f"features.heads.classifiers.{name}: {exc}",
                             hint=f"parameters of sklearn {cls.__name__}") from exc
    empty = [k for k, v in head.grid.items() if not v]
    if empty:
        raise ParameterError(f"features.heads.classifiers.{name}.grid: no values for {empty}.")
    if head.calibration is None and not hasattr(clf, "predict_proba"):
        raise ParameterError(f"features.heads.classifiers.{name}: {cls.__name__} has no "
                             "probabilities of its own.", hint="set 'calibration: sigmoid'")
    pipeline = Pipeline([("scale", StandardScaler()), (CLF_STEP, clf)])
    grid = {f"{CLF_STEP}__{k}": list(v) for k, v in head.grid.items()}
    return pipeline, grid


def _has_own_probabilities(estimator: Any) -> bool:
    # SVC defines predict_proba but raises unless probability=True.
    return hasattr(estimator, "predict_proba") and not (
        isinstance(estimator, SVC) and not estimator.probability
    )


# ------------------------------------------------------------------------------------- folds


def group_folds(
    labels: np.ndarray, groups: Sequence[Any], folds: Sequence[int] | None, cv: CvParams,
    classes: Sequence[str] | None = None,
) -> Folds:
    """Cross-validation folds over whole groups, as ``(train_rows, test_rows)`` index pairs.

    ``split_folds`` uses the split table's ``fold`` column (PredefinedSplit: each fold value is
    one test fold); ``stratified_group_kfold`` deals the groups into ``n_splits`` folds keeping
    class shares close. Either way each row is in exactly one test fold, and a group never
    straddles a fold's train and test rows (checked).
    """
    groups = np.asarray([str(g) for g in groups])
    labels = np.asarray(labels)
    n_groups = len(np.unique(groups))
    if cv.strategy == "split_folds":
        out = _predefined_folds(folds)
    else:
        if n_groups < cv.n_splits:
            raise DataError(
                f"Only {n_groups} patient group(s) among the tiles that fit the heads; "
                f"features.heads.cv.n_splits is {cv.n_splits}.",
                hint="lower features.heads.cv.n_splits or add patients")
        out = stratified_group_folds(labels, groups, cv.n_splits, cv.seed, shuffle=cv.shuffle)
    _check_folds(out, groups, labels, classes)
    return out


def _predefined_folds(folds: Sequence[int] | None) -> Folds:
    """``split_folds``: one test fold per value of the split table's ``fold`` column."""
    if folds is None:
        raise DataError("The feature table has no 'fold' column for 'split_folds'.",
                        hint="rerun the features pipeline, or use stratified_group_kfold")
    fold = np.asarray(folds, dtype=int)
    values = np.unique(fold)
    if (values < 0).any():
        raise DataError("Tiles with fold -1 (test tiles) are among the tiles that fit the "
                        "heads.", hint="features.heads.fit_splits must not include 'test'")
    if len(values) < 2:
        raise ParameterError(
            f"The split table has {len(values)} cross-validation fold(s); grouped CV of the "
            "heads needs at least 2.",
            hint="set splitting.n_folds >= 2 and rerun `kedro run --pipeline=splitting`, or "
                 "use features.heads.cv.strategy: stratified_group_kfold")
    return [(np.flatnonzero(fold != v), np.flatnonzero(fold == v)) for v in values]


def _check_folds(out: Folds, groups: np.ndarray, labels: np.ndarray,
                 classes: Sequence[str] | None) -> None:
    """Each fold: no group on both sides, neither side empty, every class among its training
    rows (a head cannot learn, nor calibrate for, a class it never sees)."""
    # A guard against a broken split table (its own folds); StratifiedGroupKFold cannot leak.
    check_group_folds(out, groups, hint="rerun `kedro run --pipeline=splitting`")
    for i, (train, test) in enumerate(out):
        if len(train) == 0 or len(test) == 0:
            raise DataError(f"CV fold {i} is empty on one side.",
                            hint="add patients, or lower the number of folds")
        lacking = sorted(set(labels.tolist()) - set(labels[train].tolist()))
        if lacking:  # a head cannot learn (nor calibrate for) a class it never sees
            names = [classes[k] for k in lacking] if classes is not None else lacking
            raise DataError(
                f"CV fold {i} leaves no patient of class(es) {names} to fit on: grouped "
                "CV needs every class among each fold's training groups.",
                hint="fit on more groups (features.heads.fit_splits: [train, validation]), use "
                     "fewer folds, or add patients")


# ---------------------------------------------------------------------------------- fitting


@dataclass
class FittedHead:
    """A fitted head and what chose it."""

    name: str
    model: Any  # Pipeline, or CalibratedClassifierCV around one
    best_params: dict[str, Any]
    cv_score_mean: float
    cv_score_std: float
    cv_results: pd.DataFrame
    fit_seconds: float
    calibration: str | None


def fit_head(
    name: str, head: HeadParams, x: np.ndarray, y: np.ndarray, folds: Folds, scoring: str,
    n_jobs: int,
) -> FittedHead:
    """Grid search on the grouped folds, then refit on all rows (calibrated where needed)."""
    pipeline, grid = make_head(name, head)
    started = time.perf_counter()
    search = GridSearchCV(pipeline, grid, scoring=scoring, cv=folds, n_jobs=n_jobs, refit=True,
                          error_score="raise")
    search.fit(x, y)
    best = search.best_estimator_
    calibration = head.calibration
    if calibration is None and not _has_own_probabilities(best.named_steps[CLF_STEP]):
        raise ParameterError(f"features.heads.classifiers.{name}: no probabilities.",
                             hint="set 'calibration: sigmoid'")
    if calibration is not None:
        model: Any = CalibratedClassifierCV(clone(best), method=calibration, cv=folds,
                                            ensemble=False)
        model.fit(x, y)
    else:
        model = best
    seconds = time.perf_counter() - started
    results = pd.DataFrame(search.cv_results_)
    keep = ["params", "mean_test_score", "std_test_score", "rank_test_score", "mean_fit_time"]
    table = results[keep].copy()
    table["params"] = [_plain_params(p) for p in table["params"]]
    table.insert(0, "head", name)
    best_params = _plain_params(search.best_params_)
    i = int(search.best_index_)
    logger.info("Head %s: %s, CV %s %.3f +/- %.3f over %d grouped folds, %.1fs%s", name,
                best_params, scoring, results["mean_test_score"][i],
                results["std_test_score"][i], len(folds), seconds,
                f", {calibration} calibration" if calibration else "")
    return FittedHead(name, model, best_params, float(results["mean_test_score"][i]),
                      float(results["std_test_score"][i]), table, seconds, calibration)


def _plain_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """``{"clf__C": np.float64(1.0)}`` -> ``{"C": 1.0}``: readable, JSON- and MLflow-safe."""
    out = {}
    for key, value in params.items():
        short = key.split("__", 1)[1] if key.startswith(f"{CLF_STEP}__") else key
        out[short] = value.item() if isinstance(value, np.generic) else value
    return out
