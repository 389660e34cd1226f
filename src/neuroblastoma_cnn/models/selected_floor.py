"""The selected floor: the classical model whose image scale, feature groups and head are chosen
on grouped inner folds.

Why: ``ColourTextureSVM`` fixes the scale (1/8) and the features (101 numbers) and tunes only
the SVM; on BACH a plain colour-histogram SVM at a quarter of the size did better. Which
description and which learner suit a tissue is a question for the data, so
:class:`SelectedFloor` tries every combination of ``scales`` x ``feature_sets`` x head
settings (RBF SVM, logistic regression, gradient boosting) on folds of whole groups
(patients) inside its training images and keeps the best by mean macro-F1; the kept head is
then refitted on every training image (the SVM with probabilities calibrated on the same
folds). No choice ever sees an image whose group it is scored on.

Features come as a *bank*: ``{scale: (n_images, N_ALL_FEATURES) array}`` from
:func:`describe_bank`, computed once per scale and sliced per feature set, so the search costs
model fits only. Pure NumPy and scikit-learn: no Kedro, no TensorFlow.
"""

from __future__ import annotations

import itertools
import logging
import pickle
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from neuroblastoma_cnn.core.errors import DataError, ModelError, ParameterError
from neuroblastoma_cnn.images.preprocessing import Preprocessing

from .classical import (
    ColourTextureSVM,
    check_inner_folds,
    describe_images,
    group_columns,
    grouped_folds,
)

logger = logging.getLogger(__name__)

#: Calibration of the SVM head by one temperature over its own decision values (argmax kept).
TEMPERATURE = "temperature"
#: The heads a candidate may end with, cheapest first (the order breaks ties).
HEADS = ("logistic", "svm", "boosting")
#: Each head's settings (lists in the YAML, one candidate per combination).
HEAD_SETTINGS = {"logistic": ("C",), "svm": ("C", "gamma_factor"),
                 "boosting": ("learning_rate", "max_iter")}


@dataclass(frozen=True)
class Candidate:
    """One point of the search: image scale (1/``scale``), feature groups, head and settings."""

    scale: int
    groups: tuple[str, ...]
    head: str
    settings: tuple[tuple[str, float], ...]

    def describe(self) -> str:
        values = ", ".join(f"{k}={v:g}" for k, v in self.settings)
        return f"1/{self.scale} {'+'.join(self.groups)} {self.head}({values})"


def describe_bank(paths: Sequence[Path], scales: Sequence[int], where: str | None = None
                  ) -> dict[int, np.ndarray]:
    """Every feature group of every image at each scale: ``{scale: (n, N_ALL_FEATURES)}``."""
    return {int(s): describe_images(paths, int(s), where=where, every_group=True)
            for s in scales}


def make_head(head: str, settings: Mapping[str, float], n_features: int, seed: int,
              max_leaf_nodes: int = 15) -> Any:
    """An unfitted scikit-learn head of :data:`HEADS` with ``settings`` (balanced classes):
    the selected floor's learners and the stacked hybrid's meta-learners."""
    if head == "svm":
        return make_pipeline(StandardScaler(), SVC(
            kernel="rbf", class_weight="balanced", C=settings["C"],
            gamma=settings["gamma_factor"] / n_features))
    if head == "logistic":
        return make_pipeline(StandardScaler(), LogisticRegression(
            C=settings["C"], class_weight="balanced", max_iter=5000))
    return HistGradientBoostingClassifier(
        learning_rate=settings["learning_rate"], max_iter=int(settings["max_iter"]),
        max_leaf_nodes=max_leaf_nodes, class_weight="balanced", early_stopping=False,
        random_state=seed)


def _estimator(candidate: Candidate, n_features: int, seed: int) -> Any:
    return make_head(candidate.head, dict(candidate.settings), n_features, seed)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _decision(model: Any, x: np.ndarray) -> np.ndarray:
    """The SVM's decision values, one column per class (two classes: ``-d, d``)."""
    d = np.asarray(model.decision_function(x), dtype=np.float64)
    return np.column_stack([-d, d]) if d.ndim == 1 else d


def _svm_temperature(model: Any, x: np.ndarray, codes: np.ndarray, folds: Any) -> float:
    """T of ``softmax(decision / T)`` minimising the log-loss of the grouped folds' out-of-fold
    SVM decision values: probabilities whose argmax stays the SVM's own decision (a sigmoid
    per class can reorder the classes, and cost the floor 0.02 macro-F1 on BACH)."""
    decision = np.zeros((len(codes), int(codes.max()) + 1))
    for train, test in folds:
        decision[test] = _decision(clone(model).fit(x[train], codes[train]), x[test])

    def loss(log_t: float) -> float:
        prob = _softmax(decision / np.exp(log_t))
        return float(-np.log(np.clip(prob[np.arange(len(codes)), codes], 1e-12, 1)).mean())

    return float(np.exp(minimize_scalar(loss, bounds=(-5.0, 5.0), method="bounded").x))


class SelectedFloor:
    """The classical model with scale, feature groups and head chosen on grouped inner folds.

    ``heads`` maps a head of :data:`HEADS` to its settings' value lists, e.g.
    ``{"svm": {"C": [1, 10], "gamma_factor": [0.3, 1]}, "logistic": {"C": [0.1]}}``;
    ``feature_sets`` lists groups of :data:`~.classical.FEATURE_GROUPS`. After :meth:`fit`:
    ``chosen_`` (the :class:`Candidate`), ``cv_score_`` (its mean inner macro-F1),
    ``scores_`` (every candidate's) and ``classes_`` (the column order of probabilities).
    """

    def __init__(self, scales: Sequence[int], feature_sets: Sequence[Sequence[str]],
                 heads: Mapping[str, Mapping[str, Sequence[float]]], inner_folds: int,
                 calibration: str = "sigmoid", seed: int = 0):
        if not scales or min(int(s) for s in scales) < 1:
            raise ParameterError(f"Selected floor: scales = {list(scales)}: give one or more "
                                 "integers >= 1 (images are described at 1/scale).")
        if not feature_sets or not all(feature_sets):
            raise ParameterError("Selected floor: feature_sets must be a non-empty list of "
                                 "non-empty lists of feature groups.")
        for groups in feature_sets:
            group_columns(groups)  # unknown groups: one line naming them
        unknown = sorted(set(heads) - set(HEADS))
        if not heads or unknown:
            raise ParameterError(f"Selected floor: heads {unknown or '(none)'}: choose among "
                                 f"{', '.join(HEADS)}.")
        for head, settings in heads.items():
            missing = sorted(set(HEAD_SETTINGS[head]) - set(settings))
            if missing or any(not list(v) for v in settings.values()):
                raise ParameterError(f"Selected floor: heads.{head} needs non-empty lists for "
                                     f"{', '.join(HEAD_SETTINGS[head])}.")
        check_inner_folds("Selected floor", inner_folds,
                          None if calibration == TEMPERATURE else calibration)
        self.scales = [int(s) for s in scales]
        self.feature_sets = [tuple(g) for g in feature_sets]
        self.heads = {h: {k: [float(v) for v in heads[h][k]] for k in HEAD_SETTINGS[h]}
                      for h in HEADS if h in heads}
        self.inner_folds = int(inner_folds)
        self.calibration = calibration
        self.seed = int(seed)

    def candidates(self) -> list[Candidate]:
        """Every combination, in a fixed order (coarser scales and cheaper heads first)."""
        out = []
        for scale in sorted(self.scales, reverse=True):
            for groups in self.feature_sets:
                for head, settings in self.heads.items():
                    keys = HEAD_SETTINGS[head]
                    for values in itertools.product(*(settings[k] for k in keys)):
                        pairs = tuple(zip(keys, values, strict=True))
                        out.append(Candidate(scale, groups, head, pairs))
        return out

    # ------------------------------------------------------------------------- fitting

    def fit(self, bank: Mapping[int, np.ndarray], labels: Sequence[Any], groups: Sequence[Any]
            ) -> SelectedFloor:
        """Scores every candidate on grouped inner folds, keeps the best, refits it on all rows."""
        started = time.perf_counter()
        y, g = self._checked(bank, labels, groups)
        self.classes_ = [str(c) for c in np.unique(y)]
        codes = np.searchsorted(self.classes_, y)
        folds = grouped_folds(y, g, self.inner_folds, self.seed)
        candidates = self.candidates()
        if folds is None:
            self.chosen_, self.cv_score_, self.scores_ = candidates[0], float("nan"), []
            folds = [(np.arange(len(y)), np.arange(len(y)))]
            logger.warning("Selected floor: no grouped folds; %s without a search, in-sample "
                           "probabilities", candidates[0].describe())
        else:
            self.scores_ = [(c, self._score(c, bank, codes, folds)) for c in candidates]
            self.chosen_, self.cv_score_ = max(self.scores_, key=lambda item: item[1])
        self.n_inner_folds_ = len(folds)
        x = self._columns(bank, self.chosen_)
        model = _estimator(self.chosen_, x.shape[1], self.seed)
        self.temperature_ = None
        if self.chosen_.head == "svm" and self.calibration == TEMPERATURE:
            self.temperature_ = _svm_temperature(model, x, codes, folds)
        elif self.chosen_.head == "svm":
            model = CalibratedClassifierCV(model, method=self.calibration, cv=folds,
                                           ensemble=False)
        self.model_ = model.fit(x, codes)
        logger.info("Selected floor: %s, inner CV macro-F1 %.3f over %d grouped fold(s); %d "
                    "candidates in %.0f s", self.chosen_.describe(), self.cv_score_,
                    len(folds), len(candidates), time.perf_counter() - started)
        return self

    def fit_images(self, paths: Sequence[Path], labels: Sequence[Any], groups: Sequence[Any]
                   ) -> SelectedFloor:
        """:meth:`fit` on image files (described at every scale of the search)."""
        return self.fit(describe_bank(paths, self.scales, where="selected floor"), labels,
                        groups)

    def _score(self, candidate: Candidate, bank: Mapping[int, np.ndarray], codes: np.ndarray,
               folds: Any) -> float:
        x = self._columns(bank, candidate)
        base = _estimator(candidate, x.shape[1], self.seed)
        scores = []
        for train, test in folds:
            model = clone(base).fit(x[train], codes[train])
            scores.append(f1_score(codes[test], model.predict(x[test]), average="macro"))
        return float(np.mean(scores))

    @staticmethod
    def _columns(bank: Mapping[int, np.ndarray], candidate: Candidate) -> np.ndarray:
        return np.asarray(bank[candidate.scale])[:, group_columns(candidate.groups)]

    # ----------------------------------------------------------------------- predicting

    def predict_proba(self, bank: Mapping[int, np.ndarray]) -> np.ndarray:
        """Probabilities, one column per class of ``classes_``: ``bank`` holds at least the
        chosen scale."""
        if self.chosen_.scale not in bank:
            raise DataError(f"Selected floor: features at 1/{self.chosen_.scale} are needed "
                            f"(got scales {sorted(bank)}).")
        x = self._columns(bank, self.chosen_)
        if getattr(self, "temperature_", None) is not None:
            return _softmax(_decision(self.model_, x) / self.temperature_)
        return np.asarray(self.model_.predict_proba(x))

    def predict_proba_images(self, paths: Sequence[Path], where: str | None = None
                             ) -> np.ndarray:
        """:meth:`predict_proba` of image files (described at the chosen scale only)."""
        return self.predict_proba(describe_bank(paths, [self.chosen_.scale], where=where))

    def probabilities_over(self, bank: Mapping[int, np.ndarray], classes: Sequence[str]
                           ) -> np.ndarray:
        """:meth:`predict_proba` with one column per name of ``classes`` (a class it never
        saw gets 0), as :meth:`ColourTextureSVM.probabilities_over`."""
        prob = np.zeros((len(next(iter(bank.values()))), len(classes)))
        prob[:, [list(classes).index(c) for c in self.classes_]] = self.predict_proba(bank)
        return prob

    def predict(self, bank: Mapping[int, np.ndarray]) -> np.ndarray:
        return np.asarray(self.classes_, dtype=object)[self.predict_proba(bank).argmax(1)]

    def _checked(self, bank: Mapping[int, np.ndarray], labels: Sequence[Any],
                 groups: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        missing = sorted(set(self.scales) - set(bank))
        if missing:
            raise DataError(f"Selected floor: no features at scale(s) {missing}: describe the "
                            "images with describe_bank(paths, scales).")
        y = np.asarray([str(v) for v in labels])
        g = np.asarray([str(v) for v in groups])
        for scale in self.scales:
            ColourTextureSVM._checked(bank[scale], y, g)  # same rows, finite, two classes
        return y, g



# --------------------------------------------------------------------- a servable model


class ClassicalImageModel:
    """A fitted classical model (:class:`SelectedFloor`) with the preprocessing record every
    served model carries (classes, image checks, the tile store's tiling for the record's
    sake, ``architecture`` = its family, the conformal calibration): what ``predict``, the
    command line and the raw-image pyfunc take like a Keras model. It reads whole images at its
    chosen scale (no tiles, no convolutions: no Grad-CAM)."""

    kind = "classical"

    def __init__(self, floor: SelectedFloor, preprocessing: Preprocessing):
        if list(preprocessing.classes) != list(floor.classes_):
            raise ModelError(f"Classical model: record classes {list(preprocessing.classes)} "
                             f"differ from the fitted classes {floor.classes_}.")
        self.floor = floor
        self.preprocessing = preprocessing
        self.name = preprocessing.architecture or "classical"
        self.family = self.name  # what Grad-CAM asks: a family without convolutions says so
        self.model_source = self.name

    def predict_file(self, path: Path) -> np.ndarray:
        """One image file's probabilities (``ImageRejected`` when it cannot be described)."""
        return self.floor.predict_proba(describe_bank([path], [self.floor.chosen_.scale]))[0]


def save_classical(model: ClassicalImageModel, path: str | Path) -> None:
    """Writes the model (joblib) to ``path``, through a temporary file: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    joblib.dump({"format": CLASSICAL_FORMAT, "model": model}, partial)
    partial.replace(path)


def load_classical(path: str | Path) -> ClassicalImageModel:
    """A model :func:`save_classical` wrote (this project's own files only: joblib runs code)."""
    try:
        content = joblib.load(path)
    except (OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise ModelError(f"Classical model file '{path}' cannot be read: {exc}") from exc
    if not isinstance(content, dict) or content.get("format") != CLASSICAL_FORMAT:
        raise ModelError(f"'{path}' is not a classical model saved by this project.")
    model = content["model"]
    model.model_source = str(path)
    return model


CLASSICAL_FORMAT = "neuroblastoma_cnn.classical/1"
#: The file suffix of a saved classical model.
CLASSICAL_SUFFIX = ".joblib"
