"""The stacked hybrid: a scikit-learn meta-learner over the out-of-fold probabilities of base
models (the CNN, the floor...).

Why: on a few hundred images a CNN and a colour/texture model err on different images; the
mean of their probabilities dilutes the better one (README "Cross-validated"), a learner that
weighs them per class need not (and a weighted mean, ``blend``, whose one weight cannot
overfit much). The meta-learner (logistic regression, gradient boosting or the blend, and its
setting) is chosen on grouped inner folds, and it is fitted only on probabilities of images
whose groups the base models did not train on (out of fold). :func:`nested_oof` scores
it honestly: for each outer fold, a hybrid fitted on the other folds' out-of-fold rows predicts
the fold's rows, so no score is ever computed on a row that fitted it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.metrics import f1_score

from neuroblastoma_cnn.core.errors import DataError, ParameterError

from .classical import check_inner_folds, grouped_folds
from .selected_floor import make_head

logger = logging.getLogger(__name__)

META_LEARNERS = {"logistic": ("C",), "boosting": ("learning_rate", "max_iter"),
                 "blend": ("weight",)}
_EPS = 1e-4


def meta_features(base_prob: Mapping[str, np.ndarray], bases: Sequence[str]) -> np.ndarray:
    """The base models' log-probabilities side by side (``bases`` order)."""
    missing = [b for b in bases if b not in base_prob]
    if missing:
        raise DataError(f"Stacked hybrid: no probabilities of base model(s) {missing} "
                        f"(given: {sorted(base_prob)}).")
    return np.hstack([np.log(np.clip(np.asarray(base_prob[b], dtype=np.float64), _EPS, 1.0))
                      for b in bases])


def _learner(name: str, settings: Mapping[str, float], seed: int, n_bases: int) -> Any:
    if name == "blend":
        return ProbabilityBlend(weight=settings["weight"], n_bases=n_bases)
    return make_head(name, settings, n_features=0, seed=seed, max_leaf_nodes=7)


class ProbabilityBlend(ClassifierMixin, BaseEstimator):
    """A weighted mean of the bases' probabilities: ``weight`` for the first base, the rest
    shared equally by the others; nothing else is fitted.

    Why: a learned meta-learner over a few hundred out-of-fold rows can fit the bases' quirks
    on the training folds that do not hold on the next (on grouped BACH a logistic or boosted
    stack scored below both of its bases); one weight chosen on inner folds cannot overfit
    much, and weights 0 and 1 fall back to a single base."""

    def __init__(self, weight: float = 0.5, n_bases: int = 2):
        self.weight = weight
        self.n_bases = n_bases

    def fit(self, x: np.ndarray, y: np.ndarray) -> ProbabilityBlend:
        self.classes_ = np.unique(y)
        if np.shape(x)[1] != self.n_bases * len(self.classes_):
            raise DataError(f"Stacked hybrid (blend): {np.shape(x)[1]} probability columns for "
                            f"{self.n_bases} bases, but {len(self.classes_)} classes among the "
                            "rows it is fitted on: every class must be in each training part.")
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        prob = np.exp(x).reshape(len(x), self.n_bases, -1)
        rest = (1.0 - self.weight) / max(self.n_bases - 1, 1)
        shares = np.array([self.weight] + [rest] * (self.n_bases - 1))
        blended = np.einsum("nbc,b->nc", prob, shares)[:, self.classes_]
        return blended / blended.sum(axis=1, keepdims=True)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(x).argmax(axis=1)]


class StackedHybrid:
    """Meta-learner over base models' probabilities, chosen on grouped inner folds.

    ``meta`` maps a learner of :data:`META_LEARNERS` to its settings' value lists. ``fit`` takes
    ``{base name: (n, n_classes) out-of-fold probabilities}`` with the images' classes (names)
    and groups; ``predict_proba`` the same mapping for new images.
    """

    def __init__(self, bases: Sequence[str], meta: Mapping[str, Mapping[str, Sequence[float]]],
                 inner_folds: int, seed: int = 0):
        unknown = sorted(set(meta) - set(META_LEARNERS))
        if not meta or unknown:
            raise ParameterError(f"Stacked hybrid: meta-learners {unknown or '(none)'}: choose "
                                 f"among {', '.join(META_LEARNERS)}.")
        if len(bases) < 2:
            raise ParameterError(f"Stacked hybrid: bases = {list(bases)}: stack two or more "
                                 "models.")
        check_inner_folds("Stacked hybrid", inner_folds)
        self.bases = list(bases)
        self.meta = {m: {k: [float(v) for v in meta[m][k]] for k in META_LEARNERS[m]}
                     for m in META_LEARNERS if m in meta}
        self.inner_folds = int(inner_folds)
        self.seed = int(seed)

    def candidates(self) -> list[tuple[str, dict[str, float]]]:
        return [(name, dict(zip(keys, values, strict=True)))
                for name, keys in META_LEARNERS.items() if name in self.meta
                for values in itertools.product(*(self.meta[name][k] for k in keys))]

    def fit(self, base_prob: Mapping[str, np.ndarray], labels: Sequence[Any],
            groups: Sequence[Any]) -> StackedHybrid:
        x = meta_features(base_prob, self.bases)
        y = np.asarray([str(v) for v in labels])
        g = np.asarray([str(v) for v in groups])
        if len(x) != len(y) or len(y) != len(g):
            raise DataError(f"Stacked hybrid: {len(x)} probability rows, {len(y)} labels and "
                            f"{len(g)} groups do not describe the same images.")
        self.classes_ = [str(c) for c in np.unique(y)]
        codes = np.searchsorted(self.classes_, y)
        folds = grouped_folds(y, g, self.inner_folds, self.seed)
        options = self.candidates()
        if folds is None:
            self.chosen_, self.cv_score_ = options[0], float("nan")
        else:
            scores = [self._score(name, settings, x, codes, folds) for name, settings in options]
            best = int(np.argmax(scores))
            self.chosen_, self.cv_score_ = options[best], scores[best]
        self.model_ = _learner(*self.chosen_, self.seed, len(self.bases)).fit(x, codes)
        logger.info("Stacked hybrid over %s: %s %s, inner CV macro-F1 %.3f", self.bases,
                    self.chosen_[0], self.chosen_[1], self.cv_score_)
        return self

    def _score(self, name: str, settings: dict[str, float], x: np.ndarray, codes: np.ndarray,
               folds: Any) -> float:
        base = _learner(name, settings, self.seed, len(self.bases))
        return float(np.mean([
            f1_score(codes[test], clone(base).fit(x[train], codes[train]).predict(x[test]),
                     average="macro") for train, test in folds]))

    def predict_proba(self, base_prob: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self.model_.predict_proba(meta_features(base_prob, self.bases)))


def nested_oof(make: Any, base_prob: Mapping[str, np.ndarray], labels: Sequence[Any],
               groups: Sequence[Any], fold_of_row: Sequence[int], classes: Sequence[str]
               ) -> np.ndarray:
    """The hybrid's own out-of-fold probabilities (columns: ``classes``): for each fold, a
    hybrid from ``make()`` fitted on the other folds' rows predicts the fold's rows."""
    fold_of_row = np.asarray(fold_of_row)
    labels = np.asarray([str(v) for v in labels])
    groups = np.asarray([str(v) for v in groups])
    out = np.zeros((len(labels), len(classes)))
    for fold in np.unique(fold_of_row):
        test = fold_of_row == fold
        hybrid = make().fit({b: np.asarray(p)[~test] for b, p in base_prob.items()},
                            labels[~test], groups[~test])
        prob = hybrid.predict_proba({b: np.asarray(p)[test] for b, p in base_prob.items()})
        out[np.ix_(test, [list(classes).index(c) for c in hybrid.classes_])] = prob
    return out
