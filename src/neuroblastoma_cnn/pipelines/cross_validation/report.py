"""The cross-validation report: every model over the same folds, the floor beside it.

What it shows and why:

* **per fold** (macro-F1 and accuracy of each model on each held-out fold): the spread a user
  would have met with one split;
* **pooled out of fold**: every image scored once by the fold that did not train on it, with
  a 95% interval that resamples whole patient groups;
* **paired against the floor**: the same folds, so the per-fold differences cancel what the
  folds share (which patients are hard); wins/losses, the mean difference with its t interval
  and the Wilcoxon p-value (with K folds it cannot go below 2/2^K: 0.0625 for 5);
* **nested**: the fold ensemble and each member on the outer test patients, which no member
  trained or chose its epoch on.

``<model>+floor`` is the mean of the two probability sets image by image (a late-fusion
hybrid): scored on the same folds, it costs nothing to report. Pure pandas/NumPy.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from neuroblastoma_cnn.analysis import metrics as m
from neuroblastoma_cnn.analysis.model_card import build_cv_model_card, markdown_to_html
from neuroblastoma_cnn.analysis.predictions import probability_columns
from neuroblastoma_cnn.datasets.tile_store import TileStore
from neuroblastoma_cnn.images.preprocessing import Preprocessing
from neuroblastoma_cnn.params import (
    CrossValidationParams,
    EvaluationParams,
    ModelParams,
    TrainingParams,
)
from neuroblastoma_cnn.trials import statistics as st

from .nodes import HELD_OUT_SET, OUTER_SET

logger = logging.getLogger(__name__)

FLOOR = "floor"
KEYS = ["image_path", "label", "group"]


def _classes(frame: pd.DataFrame) -> list[str]:
    prefix = "prob_"
    return [c[len(prefix):] for c in probability_columns(frame)]


def _scores(images: pd.DataFrame, classes: list[str], evaluation: EvaluationParams
            ) -> dict[str, float]:
    """Macro-F1 with its group-bootstrap interval, and accuracy, of image predictions."""
    y_true = images["label"].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy()
    prob = images[[f"prob_{c}" for c in classes]].to_numpy(dtype=float)
    y_pred = prob.argmax(axis=1)
    ci = m.bootstrap_macro_f1(y_true, y_pred, images["group"].astype(str).to_numpy(),
                              n_boot=evaluation.bootstrap_samples, seed=evaluation.seed)
    return {"f1_macro": float(ci["point"]), "ci_low": float(ci["low"]),
            "ci_high": float(ci["high"]), "accuracy": float((y_true == y_pred).mean()),
            "n_images": len(images), "n_groups": int(images["group"].nunique())}


def _fused(a: pd.DataFrame, b: pd.DataFrame, classes: list[str], name: str) -> pd.DataFrame:
    """The image-by-image mean of two models' probabilities on the same rows."""
    cols = [f"prob_{c}" for c in classes]
    keys = ["fold", "set", *KEYS]
    joined = a[keys + cols].merge(b[keys + cols], on=keys, suffixes=("", "_b"), validate="1:1")
    for c in cols:
        joined[c] = (joined[c] + joined[f"{c}_b"]) / 2
    return joined[keys + cols].assign(model=name)


def candidates(cv_predictions: pd.DataFrame, floor_predictions: pd.DataFrame
               ) -> dict[str, pd.DataFrame]:
    """Every model the report compares, by name: the CNN, the floor, their mean."""
    out = {str(name): part for name, part in cv_predictions.groupby("model", sort=False)}
    if len(floor_predictions):
        out[FLOOR] = floor_predictions
        classes = _classes(cv_predictions)
        for name in list(out):
            if name != FLOOR:
                out[f"{name}+{FLOOR}"] = _fused(out[name], floor_predictions, classes,
                                                f"{name}+{FLOOR}")
    return out


def fold_metrics(models: dict[str, pd.DataFrame], classes: list[str],
                 evaluation: EvaluationParams) -> pd.DataFrame:
    """One row per (model, fold): the held-out fold's scores."""
    rows = []
    for name, frame in models.items():
        held = frame[frame["set"] == HELD_OUT_SET]
        for fold, part in held.groupby("fold", sort=True):
            rows.append({"model": name, "fold": int(fold), **_scores(part, classes, evaluation)})
    return pd.DataFrame(rows)


def ensemble_weights(cv_trials: pd.DataFrame, params: CrossValidationParams) -> dict[int, float]:
    """Each fold model's weight in the ensemble (as ``build_cv_ensemble`` uses them)."""
    folds = cv_trials.sort_values("fold")
    raw = (np.ones(len(folds)) if params.ensemble.weights == "equal"
           else folds["val_macro_f1"].clip(lower=1e-6).to_numpy(dtype=float))
    return dict(zip(folds["fold"].astype(int), raw / raw.sum(), strict=True))


def outer_scores(frame: pd.DataFrame, classes: list[str], weights: dict[int, float],
                 evaluation: EvaluationParams) -> dict[str, float]:
    """The members' mean and the weighted ensemble on the outer patients (empty: no outer)."""
    outer = frame[frame["set"] == OUTER_SET]
    if outer.empty:
        return {}
    cols = [f"prob_{c}" for c in classes]
    members = [_scores(part, classes, evaluation)["f1_macro"]
               for _, part in outer.groupby("fold", sort=True)]
    weighted = outer.assign(w=outer["fold"].map(weights).fillna(1.0 / len(members)))
    for c in cols:
        weighted[c] = weighted[c] * weighted["w"]
    mean = weighted.groupby(KEYS, sort=True)[cols].sum().reset_index()
    total = weighted.groupby(KEYS, sort=True)["w"].sum().to_numpy()[:, None]
    mean[cols] = mean[cols].to_numpy() / total
    ens = _scores(mean, classes, evaluation)
    return {"outer_ensemble_f1": ens["f1_macro"], "outer_ci_low": ens["ci_low"],
            "outer_ci_high": ens["ci_high"], "outer_mean_member": float(np.mean(members)),
            "outer_sd_member": float(np.std(members, ddof=1)) if len(members) > 1 else np.nan,
            "outer_gain": ens["f1_macro"] - float(np.mean(members)),
            "outer_images": ens["n_images"], "outer_groups": ens["n_groups"]}


def summary_table(models: dict[str, pd.DataFrame], per_fold: pd.DataFrame, classes: list[str],
                  weights: dict[int, float], evaluation: EvaluationParams) -> pd.DataFrame:
    """One row per model: over folds, pooled out of fold, against the floor, nested."""
    wide = per_fold.pivot_table(index="fold", columns="model", values="f1_macro")
    cnn = {name for name in models if name != FLOOR and not name.endswith(f"+{FLOOR}")}
    pooled_of = {name: _scores(frame[frame["set"] == HELD_OUT_SET], classes, evaluation)
                 for name, frame in models.items()}
    rows = []
    for name, frame in models.items():
        spread = st.mean_interval(wide[name].tolist())
        pooled = pooled_of[name]
        row = {"model": name, "folds": spread["n"], "folds_mean": spread["mean"],
               "folds_sd": spread["sd"], "folds_ci_low": spread["ci_low"],
               "folds_ci_high": spread["ci_high"], "pooled_f1": pooled["f1_macro"],
               "pooled_ci_low": pooled["ci_low"], "pooled_ci_high": pooled["ci_high"],
               "pooled_accuracy": pooled["accuracy"], "images": pooled["n_images"]}
        if FLOOR in wide and name != FLOOR:
            paired = st.paired_comparison(wide[name].tolist(), wide[FLOOR].tolist())
            row.update({"vs_floor_pooled": pooled["f1_macro"] - pooled_of[FLOOR]["f1_macro"],
                        "vs_floor_mean_diff": paired["mean_diff"],
                        "vs_floor_ci_low": paired["diff_ci_low"],
                        "vs_floor_ci_high": paired["diff_ci_high"],
                        "wins": paired["wins"], "losses": paired["losses"],
                        "p_value": paired["p_value"]})
        # The configured weights are the CNN's (its folds' validation scores); the floor has
        # no validation score, so its fold models (and the fused rows) count equally.
        row.update(outer_scores(frame, classes, weights if name in cnn else {}, evaluation))
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def report_markdown(summary: pd.DataFrame, per_fold: pd.DataFrame, title: str,
                    n_folds: int) -> str:
    """The summary as Markdown: the table a user reads first, then the per-fold scores."""
    head = ["Model", "Folds: macro-F1 mean ± sd [95% CI]", "Pooled out-of-fold [95% CI]",
            "vs floor: Δ per fold [95% CI], W/L, p", "Outer: ensemble [95% CI]",
            "Outer: mean member"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary.to_dict("records"):
        vs = "-" if not np.isfinite(r.get("vs_floor_mean_diff", np.nan)) else (
            f"{r['vs_floor_mean_diff']:+.3f} [{_fmt(r['vs_floor_ci_low'])}, "
            f"{_fmt(r['vs_floor_ci_high'])}], {int(r['wins'])}/{int(r['losses'])}, "
            f"{_fmt(r['p_value'])}")
        outer = "-" if not np.isfinite(r.get("outer_ensemble_f1", np.nan)) else (
            f"{_fmt(r['outer_ensemble_f1'])} [{_fmt(r['outer_ci_low'])}-"
            f"{_fmt(r['outer_ci_high'])}]")
        lines.append("| " + " | ".join([
            str(r["model"]),
            f"{_fmt(r['folds_mean'])} ± {_fmt(r['folds_sd'])} [{_fmt(r['folds_ci_low'])}-"
            f"{_fmt(r['folds_ci_high'])}]",
            f"{_fmt(r['pooled_f1'])} [{_fmt(r['pooled_ci_low'])}-{_fmt(r['pooled_ci_high'])}]",
            vs, outer, _fmt(r.get("outer_mean_member", np.nan))]) + " |")
    wide = per_fold.pivot_table(index="model", columns="fold", values="f1_macro", sort=False)
    lines += ["", "Macro-F1 per held-out fold:", "",
              "| Model | " + " | ".join(f"fold {f}" for f in wide.columns) + " |",
              "|---|" + "---|" * len(wide.columns)]
    for name, values in wide.iterrows():
        lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in values) + " |")
    lines += ["", f"Pooled: every image of the folds scored once, by the model of the fold "
              "that did not train on it; intervals resample whole patient groups. With "
              f"{n_folds} folds the Wilcoxon p-value cannot go below {2 / 2 ** n_folds:.4f}. "
              "Outer: the outer test patients, on which no fold model trained or chose its "
              "epoch (nested)."]
    return "\n".join(lines) + "\n"


def _metric_name(model: str) -> str:
    """MLflow refuses '+' in metric names: ``resnet34+floor`` -> ``resnet34_plus_floor``."""
    return model.replace("+", "_plus_")


def pooled_confusion(frame: pd.DataFrame, classes: list[str]
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Counts and row-normalised confusion matrix of the pooled out-of-fold predictions."""
    held = frame[frame["set"] == HELD_OUT_SET]
    index = {c: i for i, c in enumerate(classes)}
    y_true = held["label"].astype(str).map(index).to_numpy()
    y_pred = held[[f"prob_{c}" for c in classes]].to_numpy(dtype=float).argmax(axis=1)
    return (m.confusion_matrix_frame(y_true, y_pred, classes, normalize=False),
            m.confusion_matrix_frame(y_true, y_pred, classes, normalize=True))


def summarize_cross_validation(
    cv_predictions: pd.DataFrame, cv_floor_predictions: pd.DataFrame, cv_trials: pd.DataFrame,
    evaluation: EvaluationParams, params: CrossValidationParams,
) -> tuple[pd.DataFrame, pd.DataFrame, str, pd.DataFrame, Figure, dict[str, Any]]:
    """Summary table, per-fold metrics, Markdown report, pooled confusion matrix (table and
    figure) and the MLflow metrics of one model's cross-validation."""
    classes = _classes(cv_predictions)
    model = str(cv_predictions["model"].iloc[0])
    models = candidates(cv_predictions, cv_floor_predictions)
    per_fold = fold_metrics(models, classes, evaluation)
    summary = summary_table(models, per_fold, classes, ensemble_weights(cv_trials, params),
                            evaluation)
    report = report_markdown(summary, per_fold, f"Cross-validation of {model} "
                             f"({params.n_folds} folds)", params.n_folds)
    counts, normalized = pooled_confusion(models[model], classes)
    for r in summary.to_dict("records"):
        logger.info("Cross-validation %s: folds %.3f ± %.3f, pooled out-of-fold %.3f "
                    "[%.3f-%.3f]%s", r["model"], r["folds_mean"], r["folds_sd"], r["pooled_f1"],
                    r["pooled_ci_low"], r["pooled_ci_high"],
                    "" if not np.isfinite(r.get("outer_ensemble_f1", np.nan)) else
                    f"; outer ensemble {r['outer_ensemble_f1']:.3f} vs mean member "
                    f"{r['outer_mean_member']:.3f}")
    flat = {f"cv.{_metric_name(r['model'])}.{k}": {"value": float(v), "step": 0}
            for r in summary.to_dict("records") for k, v in r.items()
            if k != "model" and isinstance(v, (int, float)) and np.isfinite(v)}
    return (summary, per_fold, report, counts,
            m.plot_confusion_matrix(counts, normalized), flat)


def write_cv_model_card(cv_summary: pd.DataFrame, cv_folds: pd.DataFrame, tiles: TileStore,
                        model_params: dict[str, Any], training_params: dict[str, Any],
                        run_context: dict[str, Any]) -> tuple[str, str]:
    """The cross-validation run's model card (the fold ensemble's), Markdown and HTML: the
    summary above beside the data per fold, preprocessing, recipe, intended use and how to
    reproduce the run (see ``analysis.model_card``). The model's parameters come as plain
    blocks, as for ``run_cv_folds``, and are validated here."""
    record = Preprocessing.from_store(tiles)
    name = str(run_context.get("model") or record.architecture or "model")
    model = ModelParams.parse(dict(model_params), f"{name}.model")
    training = TrainingParams.parse(dict(training_params), f"{name}.training")
    card = build_cv_model_card(cv_summary, cv_folds, record, model, training, run_context)
    return card, markdown_to_html(card, title=f"Model card: {model.architecture} fold ensemble")
