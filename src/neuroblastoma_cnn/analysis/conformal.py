"""Prediction sets: class-conditional (Mondrian) split-conformal sets from out-of-fold
probabilities, and the ``refer`` flag of an answer the model cannot decide.

Why: a probability of 0.6 from a model trained on a few dozen patients says little; a set of
classes that holds the true class for ``coverage`` of the images *of each class* (Vovk's
Mondrian conformal prediction) is a statement a pathologist can act on: one class, the model
decides; two or more (or none), the image is referred. Calibration uses out-of-fold
probabilities (each image scored by a model that never trained on its patient), so the
calibration images are exchangeable with new patients' images as far as the folds are.

The library is ``crepes`` (``ConformalClassifier`` with the true class as the Mondrian
category, the way its ``WrapClassifier(class_cond=True)`` does it): it takes precomputed
non-conformity scores, so the same code calibrates a CNN, the floor, a fold ensemble or the
stacked hybrid from their stored probabilities without refitting them (MAPIE 1.x's
``SplitConformalClassifier`` wants the estimator itself). Non-conformity is the hinge score
``1 - p(class)``; p-values are not smoothed, so a served answer is the same on every call.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from neuroblastoma_cnn.analysis.predictions import probability_column
from neuroblastoma_cnn.core.errors import DataError, ParameterError


def _conformal_classifier() -> Any:
    """crepes' ``ConformalClassifier``, imported so that crepes' module-level
    ``warnings.simplefilter("always", UserWarning)`` does not undo the project's warning
    filters (runtime/quiet.py) for the whole process."""
    with warnings.catch_warnings():
        from crepes import ConformalClassifier  # noqa: PLC0415
    return ConformalClassifier()


#: The columns every answer gains.
SET_COLUMN, REFER_COLUMN = "prediction_set", "refer"
SEPARATOR = "|"


def check_coverage(coverage: float, where: str = "select_model.conformal.coverage") -> float:
    """``coverage`` as a float in (0, 1), or one line naming the parameter and the fix."""
    try:
        value = float(coverage)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise ParameterError(f"{where} = {coverage}: must be strictly between 0 and 1 (the "
                             "share of images whose set holds the true class), e.g. 0.9.")
    return value


class ClassConditionalConformal:
    """Class-conditional split-conformal prediction sets over stored probabilities.

    :meth:`fit` takes out-of-fold probabilities (one column per name of ``classes``), the true
    class names and the patient groups; :meth:`predict_sets` returns a boolean
    ``(n, n_classes)`` membership matrix for new probabilities.
    """

    def __init__(self, coverage: float, min_images: int = 20,
                 where: str = "select_model.conformal"):
        self.where = where  # the parameter group the messages name
        self.coverage = check_coverage(coverage, f"{where}.coverage")
        self.min_images = int(min_images)

    def shortfall(self, n_images: int, groups: Sequence[Any], n_classes: int) -> str | None:
        """Why ``n_images`` images of ``groups`` (one per image) are too few to calibrate on,
        or None: fewer than ``min_images``, or fewer patient groups than classes."""
        if n_images < self.min_images:
            return (f"{n_images} images, fewer than {self.where}.min_images = "
                    f"{self.min_images}")
        n_groups = len({str(g) for g in groups})
        if n_groups < n_classes:
            return (f"{n_groups} patient group(s) for {n_classes} classes: sets calibrated on "
                    "fewer patients than classes promise nothing")
        return None

    def fit(self, prob: np.ndarray, labels: Sequence[Any], classes: Sequence[str],
            groups: Sequence[Any]) -> ClassConditionalConformal:
        """Calibrates on ``prob`` (out of fold); fails in one line when the calibration part is
        too small to promise anything."""
        prob = np.asarray(prob, dtype=np.float64)
        self.classes_ = [str(c) for c in classes]
        y = np.asarray([str(v) for v in labels])
        if prob.ndim != 2 or prob.shape != (len(y), len(self.classes_)) or len(groups) != len(y):
            raise DataError(f"Conformal calibration: probabilities {prob.shape}, {len(y)} labels, "
                            f"{len(groups)} groups and {len(self.classes_)} classes do not "
                            "describe the same images.")
        reason = self.shortfall(len(y), groups, len(self.classes_))
        if reason:
            raise DataError(f"Conformal calibration: {reason}; calibrate on the predictions "
                            "of more patients.")
        unknown = sorted(set(y) - set(self.classes_))
        if unknown:
            raise DataError(f"Conformal calibration: labels {unknown} are not among the "
                            f"model's classes {self.classes_}.")
        truth = np.asarray([self.classes_.index(v) for v in y], dtype=int)
        alphas = 1.0 - prob[np.arange(len(y)), truth]
        self.conformal_ = _conformal_classifier().fit(alphas, bins=y)
        self.calibration_counts_ = {c: int((y == c).sum()) for c in self.classes_}
        return self

    def to_record(self) -> dict[str, Any]:
        """Plain JSON for a model's preprocessing record (``Preprocessing.conformal``)."""
        alphas, bins = self.conformal_.alphas, self.conformal_.bins
        return {"coverage": self.coverage, "classes": list(self.classes_),
                "scores": {c: [round(float(a), 6) for a in alphas[bins == c]]
                           for c in self.classes_}}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ClassConditionalConformal:
        """The calibration :meth:`to_record` wrote (no size checks: they held when it was
        made)."""
        out = cls(record["coverage"], min_images=0)
        out.classes_ = [str(c) for c in record["classes"]]
        scores = record["scores"]
        alphas = np.concatenate([np.asarray(scores[c], dtype=np.float64) for c in out.classes_])
        bins = np.concatenate([np.full(len(scores[c]), c, dtype=object) for c in out.classes_])
        out.conformal_ = _conformal_classifier().fit(alphas, bins=bins.astype(str))
        out.calibration_counts_ = {c: len(scores[c]) for c in out.classes_}
        return out

    def predict_sets(self, prob: np.ndarray) -> np.ndarray:
        """Boolean ``(n, n_classes)``: class ``c`` is in an image's set when its p-value among
        the calibration images *of class c* is at least ``1 - coverage``."""
        prob = np.asarray(prob, dtype=np.float64)
        if prob.ndim != 2 or prob.shape[1] != len(self.classes_):
            raise DataError(f"Prediction sets: expected (n, {len(self.classes_)}) "
                            f"probabilities, got {prob.shape}.")
        alphas = 1.0 - prob
        out = np.zeros(prob.shape, dtype=bool)
        if len(prob) == 0:
            return out
        for c, name in enumerate(self.classes_):
            if self.calibration_counts_.get(name, 0) == 0:
                out[:, c] = True  # no calibration image of this class: it cannot be excluded
                continue
            member = self.conformal_.predict_set(alphas, bins=np.full(len(prob), name),
                                                 confidence=self.coverage, smoothing=False)
            out[:, c] = np.asarray(member)[:, c].astype(bool)
        return out

    def set_columns(self, prob: np.ndarray) -> pd.DataFrame:
        """``prediction_set`` (class names joined by ``|``, in class order; empty: none) and
        ``refer`` (the set is not exactly one class), one row per probability row."""
        sets = self.predict_sets(prob)
        names = np.asarray(self.classes_, dtype=object)
        return pd.DataFrame({
            SET_COLUMN: [SEPARATOR.join(names[row]) for row in sets],
            REFER_COLUMN: sets.sum(axis=1) != 1,
        })


def add_prediction_sets(predictions: pd.DataFrame, calibration: Mapping[str, Any] | None,
                        classes: Sequence[str]) -> pd.DataFrame:
    """``predictions`` (``prob_<class>`` columns) with ``prediction_set`` and ``refer`` when the
    model carries a calibration; a row without probabilities (a rejected file) is referred with
    an empty set. Unchanged without a calibration."""
    if calibration is None:
        return predictions
    conformal = ClassConditionalConformal.from_record(calibration)
    prob = predictions[[probability_column(c) for c in classes]].to_numpy(dtype=np.float64)
    usable = np.isfinite(prob).all(axis=1)
    out = predictions.copy()
    out[SET_COLUMN] = ""
    out[REFER_COLUMN] = True
    if usable.any():
        columns = conformal.set_columns(prob[usable])
        out.loc[usable, SET_COLUMN] = columns[SET_COLUMN].to_numpy()
        out.loc[usable, REFER_COLUMN] = columns[REFER_COLUMN].to_numpy()
    out[REFER_COLUMN] = out[REFER_COLUMN].astype(bool)
    return out


def set_report(sets: np.ndarray, labels: Sequence[Any], classes: Sequence[str],
               predicted: Sequence[Any]) -> dict[str, Any]:
    """What the sets did on labelled images: coverage overall and per class, mean set size,
    share referred and the accuracy of the images not referred."""
    classes = [str(c) for c in classes]
    y = np.asarray([str(v) for v in labels])
    truth = np.asarray([classes.index(v) for v in y])
    covered = sets[np.arange(len(y)), truth] if len(y) else np.zeros(0, dtype=bool)
    refer = sets.sum(axis=1) != 1
    accepted = ~refer
    pred = np.asarray([str(v) for v in predicted])
    return {
        "coverage": float(covered.mean()) if len(y) else float("nan"),
        "coverage_per_class": {c: float(covered[y == c].mean()) if (y == c).any()
                               else float("nan") for c in classes},
        "mean_set_size": float(sets.sum(axis=1).mean()) if len(y) else float("nan"),
        "referred_share": float(refer.mean()) if len(y) else float("nan"),
        "accepted_accuracy": float((pred[accepted] == y[accepted]).mean())
        if accepted.any() else float("nan"),
        "n_images": len(y),
    }


def risk_coverage(prob: np.ndarray, labels: Sequence[Any], classes: Sequence[str]
                  ) -> pd.DataFrame:
    """Accuracy of the accepted images against the share referred, referring the least
    confident first (the trade-off a clinic chooses its threshold on)."""
    prob = np.asarray(prob, dtype=np.float64)
    y = np.asarray([str(v) for v in labels])
    right = np.asarray(classes, dtype=object)[prob.argmax(axis=1)] == y
    order = np.argsort(-prob.max(axis=1), kind="stable")
    kept = np.arange(1, len(y) + 1)
    accuracy = np.cumsum(right[order]) / kept
    return pd.DataFrame({"referred_share": 1.0 - kept / len(y), "accepted_accuracy": accuracy})


def plot_risk_coverage(curve: pd.DataFrame, title: str,
                       operating_point: Mapping[str, Any] | None = None) -> Any:
    """Accuracy of the accepted images against the share referred (the curve from
    :func:`risk_coverage`), with the prediction sets' own point (``set_report``'s
    ``referred_share`` and ``accepted_accuracy``) marked: where a clinic's threshold sits."""
    from matplotlib.figure import Figure  # noqa: PLC0415  (lazy: matplotlib)

    fig = Figure(figsize=(5.0, 4.2), layout="constrained")
    ax = fig.subplots()
    if len(curve):
        ax.plot(curve["referred_share"], curve["accepted_accuracy"], color="tab:blue",
                label="refer the least confident first")
    if operating_point and np.isfinite(operating_point.get("accepted_accuracy", np.nan)):
        ax.plot([operating_point["referred_share"]], [operating_point["accepted_accuracy"]],
                "o", color="tab:red", label="prediction sets (refer = not one class)")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="share of images referred",
           ylabel="accuracy of the accepted images", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig
