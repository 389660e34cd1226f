"""Evaluation metrics and figures: pure numpy / scikit-learn / matplotlib, no Kedro, no TF.

Conventions:
- ``y_true`` / ``y_pred`` are integer class indices into ``class_names``; ``y_prob`` is an
  (n, k) matrix of class probabilities with k == len(class_names).
- ``classification_metrics`` returns flat scalar keys (ready for MLflow) plus one nested
  ``"per_class"`` section; ``flatten_metrics`` turns the whole dict into MLflow-safe names.
- Tables are plain DataFrames whose labels are ordinary columns (``class``, ``true_label``),
  so they survive a CSV round trip whatever the dataset's ``index`` setting.
- Figures are ``matplotlib.figure.Figure`` objects created without pyplot: they render with
  the Agg backend, need no display and hold no global state (nothing to close).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

logger = logging.getLogger(__name__)

TRUE_LABEL = "true_label"


# -------------------------------------------------------------------------------- validation


def _labels(y: Any, n_classes: int, what: str) -> np.ndarray:
    labels = np.asarray(y)
    if labels.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array of class indices, got shape {labels.shape}.")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.mod(labels, 1) == 0):
            raise ValueError(f"{what} must hold integer class indices, got {labels.dtype}.")
        labels = labels.astype(int)
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(
            f"{what} holds class indices outside 0..{n_classes - 1} "
            f"(min {labels.min()}, max {labels.max()}) for {n_classes} class names."
        )
    return labels.astype(int)


def _probabilities(y_prob: Any, n: int, n_classes: int) -> np.ndarray:
    prob = np.asarray(y_prob, dtype=float)
    if prob.shape != (n, n_classes):
        raise ValueError(
            f"y_prob must have shape (n_samples, n_classes) = ({n}, {n_classes}), got {prob.shape}."
        )
    if not np.all(np.isfinite(prob)):
        raise ValueError("y_prob holds NaN or infinite values.")
    return prob


# ------------------------------------------------------------------------------ the metrics


def classification_metrics(
    y_true: Sequence[int], y_prob: Any, class_names: Sequence[str]
) -> dict[str, Any]:
    """All the study's metrics for one set of predictions (prediction = argmax of ``y_prob``).

    Returns flat keys ``n_samples, accuracy, balanced_accuracy, precision_macro, recall_macro,
    f1_macro, precision_weighted, recall_weighted, f1_weighted, cohen_kappa, roc_auc_macro``
    and ``per_class = {class: {precision, recall, f1, support, roc_auc}}``. A class absent
    from ``y_true`` has no ROC curve: its ``roc_auc`` is None (logged) and ``roc_auc_macro``
    averages the classes that have one (None when none has). Precision of a never-predicted
    class counts as 0 (scikit-learn ``zero_division=0``), so macro scores are not inflated.
    """
    names = list(class_names)
    k = len(names)
    labels = _labels(y_true, k, "y_true")
    if labels.size == 0:
        raise ValueError("No samples to evaluate (y_true is empty).")
    prob = _probabilities(y_prob, len(labels), k)
    pred = prob.argmax(axis=1)
    every = list(range(k))

    precision, recall, f1, support = precision_recall_fscore_support(
        labels, pred, labels=every, zero_division=0
    )
    out = _overall_scores(labels, pred, every)
    aucs = _class_aucs(labels, prob, names)
    defined = [v for v in aucs.values() if v is not None]
    out["roc_auc_macro"] = float(np.mean(defined)) if defined else None

    out["per_class"] = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
            "roc_auc": aucs[name],
        }
        for i, name in enumerate(names)
    }
    return out


def _overall_scores(labels: np.ndarray, pred: np.ndarray, every: list[int]) -> dict[str, Any]:
    """``n_samples``, accuracy, balanced accuracy, macro/weighted P, R, F1, Cohen's kappa."""
    out: dict[str, Any] = {
        "n_samples": len(labels),
        "accuracy": float(accuracy_score(labels, pred)),
        "balanced_accuracy": _balanced_accuracy(labels, pred),
    }
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            labels, pred, labels=every, average=average, zero_division=0
        )
        out[f"precision_{average}"] = float(p)
        out[f"recall_{average}"] = float(r)
        out[f"f1_{average}"] = float(f)
    out["cohen_kappa"] = _kappa(labels, pred)
    return out


def _class_aucs(labels: np.ndarray, prob: np.ndarray, names: list[str]) -> dict[str, float | None]:
    """One-vs-rest ROC-AUC per class; None (logged) where a class has no ROC curve."""
    aucs: dict[str, float | None] = {}
    for index, name in enumerate(names):
        positives = labels == index
        if positives.all() or not positives.any():
            why = "no" if not positives.any() else "only"
            logger.warning("ROC-AUC of class '%s' is undefined: %s samples of it in y_true.",
                           name, why)
            aucs[name] = None
        else:
            aucs[name] = float(roc_auc_score(positives, prob[:, index]))
    return aucs


def _balanced_accuracy(labels: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the classes present in y_true (scikit-learn's definition)."""
    with warnings.catch_warnings():  # predictions of absent classes are expected, not news
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(labels, pred))


def _kappa(labels: np.ndarray, pred: np.ndarray) -> float | None:
    """Cohen's kappa; None when undefined (expected agreement 1: a single class everywhere)."""
    if np.unique(np.concatenate([labels, pred])).size < 2:
        logger.warning("Cohen's kappa is undefined: a single class in y_true and y_pred.")
        return None
    return float(cohen_kappa_score(labels, pred))


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Flat ``{name: float}`` for ``mlflow.log_metrics``: nested keys joined by ``.``.

    ``per_class`` entries become ``<prefix>f1.<class>`` etc.; None values (undefined metrics)
    are left out, and so is text (a reason beside the numbers); characters MLflow rejects in
    names are replaced by ``_``.
    """
    flat: dict[str, float] = {}

    def safe(name: str) -> str:
        return re.sub(r"[^\w\-. /]", "_", name)

    for key, value in metrics.items():
        if key == "per_class":
            for name, values in value.items():
                for metric, number in values.items():
                    if number is not None:
                        flat[safe(f"{prefix}{metric}.{name}")] = float(number)
        elif isinstance(value, dict):
            flat.update(flatten_metrics(value, prefix=f"{prefix}{key}."))
        elif value is not None and not isinstance(value, str):
            flat[safe(f"{prefix}{key}")] = float(value)
    return flat


def classification_report_frame(
    y_true: Sequence[int], y_pred: Sequence[int], class_names: Sequence[str]
) -> pd.DataFrame:
    """The classification report as a table, one row per class then the summary rows.

    Columns: ``class, precision, recall, f1-score, support``. Rows: every class (also those
    absent from the data, support 0), then ``accuracy`` (f1-score column holds the accuracy,
    precision/recall NaN, as scikit-learn prints it), ``macro avg`` and ``weighted avg``.
    """
    names = list(class_names)
    labels = _labels(y_true, len(names), "y_true")
    pred = _labels(y_pred, len(names), "y_pred")
    if labels.shape != pred.shape:
        raise ValueError(f"y_true and y_pred differ in length ({len(labels)} vs {len(pred)}).")
    every = list(range(len(names)))
    p, r, f, s = precision_recall_fscore_support(labels, pred, labels=every, zero_division=0)
    rows = [
        {"class": name, "precision": p[i], "recall": r[i], "f1-score": f[i], "support": s[i]}
        for i, name in enumerate(names)
    ]
    rows.append({"class": "accuracy", "precision": np.nan, "recall": np.nan,
                 "f1-score": accuracy_score(labels, pred) if len(labels) else np.nan,
                 "support": len(labels)})
    for average in ("macro", "weighted"):
        ap, ar, af, _ = precision_recall_fscore_support(
            labels, pred, labels=every, average=average, zero_division=0
        )
        rows.append({"class": f"{average} avg", "precision": ap, "recall": ar, "f1-score": af,
                     "support": len(labels)})
    frame = pd.DataFrame(rows, columns=["class", "precision", "recall", "f1-score", "support"])
    frame["support"] = frame["support"].astype(int)
    return frame


def confusion_matrix_frame(
    y_true: Sequence[int], y_pred: Sequence[int], class_names: Sequence[str], normalize: bool
) -> pd.DataFrame:
    """Confusion matrix: one row per true class (``true_label`` column), one column per predicted.

    ``normalize=True`` divides each row by its total (row = recall profile of a true class);
    a class without samples keeps a row of zeros rather than NaN.
    """
    names = list(class_names)
    if TRUE_LABEL in names:
        raise ValueError(f"A class may not be named '{TRUE_LABEL}' (the row-label column).")
    labels = _labels(y_true, len(names), "y_true")
    pred = _labels(y_pred, len(names), "y_pred")
    counts = confusion_matrix(labels, pred, labels=list(range(len(names))))
    values: np.ndarray = counts
    if normalize:
        totals = counts.sum(axis=1, keepdims=True)
        values = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    frame = pd.DataFrame(values, columns=names)
    frame.insert(0, TRUE_LABEL, names)
    return frame


def _macro_f1_from_counts(counts: np.ndarray) -> np.ndarray:
    """Macro F1 of confusion matrices (..., k, k), over classes seen in truth or prediction.

    Same definition as ``f1_score(average="macro", zero_division=0)`` with its default labels
    (those present in y_true or y_pred).
    """
    tp = np.diagonal(counts, axis1=-2, axis2=-1).astype(float)
    seen = counts.sum(axis=-1) + counts.sum(axis=-2)  # = 2 tp + fp + fn
    f1 = np.divide(2 * tp, seen, out=np.zeros(tp.shape), where=seen > 0)
    present = seen > 0
    return f1.sum(axis=-1) / np.maximum(present.sum(axis=-1), 1)


def bootstrap_macro_f1(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    groups: Sequence[Any],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, float | int]:
    """Percentile bootstrap interval of macro F1 that resamples whole groups (patients).

    Tiles or images of one patient are correlated; resampling rows would pretend they are
    independent and give too narrow an interval. Each replicate draws as many groups as there
    are, with replacement, and pools all their rows. Returns ``point`` (macro F1 of all rows),
    ``low``/``high`` (the alpha/2 and 1 - alpha/2 quantiles), ``n_boot`` and ``n_groups``.
    """
    truth = np.asarray(y_true).astype(int)
    pred = np.asarray(y_pred).astype(int)
    group = np.asarray(groups)
    if not (len(truth) == len(pred) == len(group)):
        raise ValueError(
            f"y_true, y_pred and groups differ in length ({len(truth)}, {len(pred)}, {len(group)})."
        )
    if len(truth) == 0:
        raise ValueError("No samples to bootstrap.")
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"Need n_boot >= 1 and 0 < alpha < 1, got {n_boot}, {alpha}.")
    if truth.min() < 0 or pred.min() < 0:
        raise ValueError("Class indices must be >= 0.")

    k = int(max(truth.max(), pred.max())) + 1
    _, group_index = np.unique(group.astype(str), return_inverse=True)
    n_groups = int(group_index.max()) + 1
    # One confusion matrix per group; a replicate's matrix is the multiplicity-weighted sum.
    per_group = np.zeros((n_groups, k, k))
    np.add.at(per_group, (group_index, truth, pred), 1)

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    multiplicity = np.zeros((n_boot, n_groups))
    np.add.at(multiplicity, (np.repeat(np.arange(n_boot), n_groups), draws.ravel()), 1)
    replicates = _macro_f1_from_counts(np.einsum("bg,gij->bij", multiplicity, per_group))
    point = float(_macro_f1_from_counts(per_group.sum(axis=0)))
    low, high = np.quantile(replicates, [alpha / 2, 1 - alpha / 2])
    if n_groups < 10:
        logger.warning("Bootstrap over only %d groups: the interval is coarse.", n_groups)
    return {"point": point, "low": float(low), "high": float(high), "n_boot": int(n_boot),
            "n_groups": n_groups}


# ------------------------------------------------------------------------------------ figures


def _row_labels(frame: pd.DataFrame) -> tuple[list[str], pd.DataFrame]:
    if TRUE_LABEL in frame.columns:
        return [str(v) for v in frame[TRUE_LABEL]], frame.drop(columns=TRUE_LABEL)
    return [str(v) for v in frame.index], frame


def plot_confusion_matrix(counts_df: pd.DataFrame, normalized_df: pd.DataFrame) -> Figure:
    """Two panels: raw counts and row-normalised rates (frames from ``confusion_matrix_frame``)."""
    rows, counts = _row_labels(counts_df)
    _, rates = _row_labels(normalized_df)
    k = len(rows)
    side = max(4.0, 0.6 * k + 2.5)
    fig = Figure(figsize=(2 * side + 1, side), layout="constrained")
    axes = fig.subplots(1, 2)
    panels = ((counts.to_numpy(dtype=float), "Counts", "{:.0f}"),
              (rates.to_numpy(dtype=float), "Row-normalised (recall)", "{:.2f}"))
    for ax, (values, title, fmt) in zip(axes, panels, strict=True):
        vmax = 1.0 if fmt == "{:.2f}" else max(float(values.max()), 1.0)
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=vmax)
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center",
                        color="white" if values[i, j] > vmax / 2 else "black", fontsize=9)
        ax.set_xticks(range(values.shape[1]), [str(c) for c in counts.columns], rotation=45,
                      ha="right")
        ax.set_yticks(range(k), rows)
        ax.set_xlabel("Predicted")
        ax.set_ylabel("True")
        ax.set_title(title)
        fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def plot_training_curves(history_df: pd.DataFrame) -> Figure:
    """Loss and accuracy per epoch, train vs validation (plus ``val_macro_f1`` when present).

    Uses the ``epoch`` column when there is one (else 1..n); a ``stage`` column (e.g. head then
    fine_tune) draws a dashed line where the stage changes.
    """
    epochs = (history_df["epoch"].to_numpy() if "epoch" in history_df.columns
              else np.arange(1, len(history_df) + 1))
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    series = (
        (ax_loss, "loss", "train loss"), (ax_loss, "val_loss", "validation loss"),
        (ax_acc, "accuracy", "train accuracy"), (ax_acc, "val_accuracy", "validation accuracy"),
        (ax_acc, "val_macro_f1", "validation macro F1"),
    )
    for ax, column, label in series:
        if column in history_df.columns and history_df[column].notna().any():
            ax.plot(epochs, history_df[column].to_numpy(dtype=float), marker=".", label=label)
    if "stage" in history_df.columns:
        stages = history_df["stage"].astype(str).to_numpy()
        for i in np.flatnonzero(stages[1:] != stages[:-1]) + 1:
            for ax in (ax_loss, ax_acc):
                ax.axvline(epochs[i] - 0.5, color="grey", linestyle="--", linewidth=1)
            ax_loss.annotate(stages[i], (epochs[i] - 0.5, 1), xycoords=("data", "axes fraction"),
                             fontsize=8, va="top")
    ax_loss.set_title("Loss")
    ax_acc.set_title("Accuracy")
    ax_acc.set_ylim(0, 1.02)
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("Epoch")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
    return fig


def plot_roc_curves(y_true: Sequence[int], y_prob: Any, class_names: Sequence[str]) -> Figure:
    """One-vs-rest ROC curve per class; classes absent from (or alone in) y_true are skipped."""
    names = list(class_names)
    labels = _labels(y_true, len(names), "y_true")
    prob = _probabilities(y_prob, len(labels), len(names))
    fig = Figure(figsize=(6, 5.5), layout="constrained")
    ax = fig.subplots()
    for index, name in enumerate(names):
        positives = labels == index
        if positives.all() or not positives.any():
            ax.plot([], [], linestyle="none", label=f"{name} (no ROC: absent or alone)")
            continue
        fpr, tpr, _ = roc_curve(positives, prob[:, index])
        auc = roc_auc_score(positives, prob[:, index])
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title("ROC curves (one vs rest)")
    ax.legend(loc="lower right", fontsize=8)
    return fig
