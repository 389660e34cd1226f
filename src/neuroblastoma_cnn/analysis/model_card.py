"""The model card: one Markdown page (and its HTML rendering) per training run, and one per
cross-validation run (the fold ensemble, with the cross-validation summary).

Why: a trained model travels without the run that made it; the card says what it was trained
on (counts per class and split only: patients are pseudonymised and never named), how its
inputs are made, how it was trained, how well and how calibrated it scored on the held-out
patients, what it is for and not for, and the exact command and commit that reproduce it.
Everything comes from the run's own outputs and parameters; the node is pure.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from neuroblastoma_cnn.images.preprocessing import Preprocessing
from neuroblastoma_cnn.params import EvaluationParams, ModelParams, TrainingParams

INTENDED_USE = (
    "Research use only, not for diagnosis. The model classifies H&E histology images into the "
    "classes below to support research on image-based grading; it has not been validated "
    "clinically and must not guide the care of a patient.")
LIMITATIONS = [
    "Trained and tested on few patients: the test interval (resampled over patient groups) is "
    "the honest size of the uncertainty, and one split's score is partly luck (see the "
    "README's Cross-validation).",
    "Scanners, stains and sites other than the training images' may shift its predictions; "
    "stain normalisation reduces but does not remove this.",
    "Images outside the classes below are still assigned one of them; low-confidence and "
    "mostly-background images are flagged by `predict`, not refused.",
    "Calibration (ECE) is measured on few images, with 15 bins: a rough guide, not a guarantee.",
]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def kept_epoch(history: pd.DataFrame, training: TrainingParams) -> int | None:
    """The epoch the best-epoch rule kept (1-based): best ``monitor`` averaged over
    ``monitor_window`` epochs; None when the history lacks the column."""
    if history is None or training.monitor not in history or history.empty:
        return None
    if training.monitor_window > 1 and "monitor_smoothed" in history:  # what training chose on
        values = history["monitor_smoothed"].astype(float)
    else:
        values = history[training.monitor].astype(float).rolling(
            training.monitor_window, min_periods=1).mean()
    best = values.idxmin() if training.monitor == "val_loss" else values.idxmax()
    return int(history.loc[best, "epoch"]) if "epoch" in history else int(best) + 1


def count_parts(table: pd.DataFrame, parts: Sequence[str]) -> pd.DataFrame:
    """Images and patient groups per class in each part (``parts``: one name per row of
    ``table``, e.g. its split or fold): ``split, label, groups, images``, counts only."""
    return (table.assign(split=list(parts), label=table["label"].astype(str))
            .groupby(["split", "label"])
            .agg(groups=("group", "nunique"), images=("image_path", "nunique"))
            .reset_index())


def _counts_table(counts: pd.DataFrame, record: Preprocessing, parts: list[str]) -> list[str]:
    """``images / groups`` per class (rows, in label order) and part (columns)."""
    pivot = counts.pivot_table(index="label", columns="split", values=["images", "groups"],
                               aggfunc="sum", fill_value=0)
    rows = [[c, *(f"{int(pivot.loc[c, ('images', p)])} / {int(pivot.loc[c, ('groups', p)])}"
                  if ("images", p) in pivot.columns else "0 / 0" for p in parts)]
            for c in record.classes if c in pivot.index]
    return _table(["class", *parts], rows)


def _data_section(split_summary: pd.DataFrame, record: Preprocessing) -> list[str]:
    splits = [s for s in ("train", "validation", "test") if s in set(split_summary["split"])]
    return ["## Data", "", f"Classes (label order): {', '.join(record.classes)}. Images / "
            "patient groups per split (patients are pseudonymised: counts only).", "",
            *_counts_table(split_summary, record, splits), ""]


def _preprocessing_section(record: Preprocessing, training: TrainingParams) -> list[str]:
    tiling = record.tiling
    rows = [
        ["tiling", f"{tiling.tile_size} px tiles every {tiling.effective_stride} px"
         if tiling.tile_size else "whole image as one tile"],
        ["input size", f"{tiling.input_size} x {tiling.input_size} RGB"],
        ["min tissue fraction", tiling.min_tissue_fraction],
        ["decoding", tiling.decoding],
        ["stain normalisation", training.stain_normalisation or "none"],
        ["image = ", "mean of its tiles' probabilities"],
    ]
    return ["## Preprocessing", "", *_table(["step", "setting"], rows), ""]


def _training_section(model: ModelParams, training: TrainingParams,
                      history: pd.DataFrame | None) -> list[str]:
    schedule = training.schedule.type if training.schedule is not None else "constant"
    rows = [
        ["architecture", model.architecture + (
            f" (transfer from weights: {getattr(model.root, 'weights', None) or 'random'})"
            if model.transfer else " (from scratch)")],
        ["optimizer", f"{training.optimizer}, lr {training.learning_rate:g}, weight decay "
         f"{training.weight_decay:g}, schedule {schedule}"],
        ["batch size / sampling", f"{training.batch_size} / {training.sampling}"],
        ["epochs (maximum / run)", f"{training.epochs} / "
         f"{len(history) if history is not None else 'per fold (cv_trials)'}"],
        ["kept epoch", f"{_fmt(kept_epoch(history, training))} (best {training.monitor})"],
        ["label smoothing", training.label_smoothing],
        ["online augmentation", training.online_augmentation.enabled],
        ["seed / deterministic", f"{training.seed} / {_fmt(training.deterministic)}"],
    ]
    return ["## Training", "", *_table(["setting", "value"], rows), ""]


def _metrics_section(metrics: Mapping[str, Any], evaluation: EvaluationParams) -> list[str]:
    ci = metrics.get("macro_f1_ci") or {}
    lines = ["## Test results", "",
             f"{evaluation.split.capitalize()} split: {metrics.get('n_test_images')} images "
             f"of {metrics.get('n_test_groups')} patient groups. Macro-F1 "
             f"**{_fmt(metrics.get('f1_macro'))}** (95% interval {_fmt(ci.get('low'))}-"
             f"{_fmt(ci.get('high'))}, {evaluation.bootstrap_samples} resamples of patient "
             "groups); accuracy " f"{_fmt(metrics.get('accuracy'))}, balanced accuracy "
             f"{_fmt(metrics.get('balanced_accuracy'))}.", ""]
    per_class = metrics.get("per_class") or {}
    if per_class:
        rows = [[name, v.get("precision"), v.get("recall"), v.get("f1"), v.get("support")]
                for name, v in per_class.items()]
        lines += [*_table(["class", "precision", "recall", "F1", "images"], rows), ""]
    return lines


def _calibration_section(metrics: Mapping[str, Any]) -> list[str]:
    cal = metrics.get("calibration") or {}
    if cal.get("temperature") is None:
        return ["## Calibration", "", "No temperature fitted (no validation images).", ""]
    applied = ("applied to every prediction of this model" if cal.get("applied") else
               "reported only: the model's probabilities are not scaled "
               "(evaluation.temperature_scaling: false)")
    rows = [["validation", cal.get("validation_ece_before"), cal.get("validation_ece_after")],
            ["test", cal.get("ece_before"), cal.get("ece_after")]]
    return ["## Calibration", "", f"Temperature T = {_fmt(cal['temperature'])}, fitted on the "
            f"validation images; {applied}. Expected calibration error (15 bins):", "",
            *_table(["split", "ECE before", "ECE after"], rows), ""]


def unsure_section(coverage_target: float, calibration_images: int, calibrated_on: str,
                   report: Mapping[str, Any], checked_on: str) -> list[str]:
    """"When the model is unsure": how the prediction sets were calibrated and what they did on
    held-out patients (``report``: ``analysis.conformal.set_report``'s numbers)."""
    per_class = ", ".join(f"{c} {_fmt(v)}" for c, v in report["coverage_per_class"].items())
    return ["## When the model is unsure", "",
            f"Prediction sets at coverage {coverage_target:g}, calibrated on "
            f"{calibration_images} {calibrated_on}; on {checked_on}: coverage "
            f"{_fmt(report['coverage'])} ({per_class}), mean set size "
            f"{_fmt(report['mean_set_size'])}, referred {_fmt(report['referred_share'])}, "
            f"accuracy of the accepted {_fmt(report['accepted_accuracy'])}.", ""]


def _prediction_sets_section(metrics: Mapping[str, Any], evaluation: EvaluationParams
                             ) -> list[str]:
    """The run's prediction sets (calibrated on the validation images), or why it has none."""
    sets = metrics.get("prediction_sets")
    if not sets:
        return []
    if not sets.get("attached"):
        return ["## When the model is unsure", "",
                f"No prediction sets attached: {sets.get('reason')}. Answers carry no "
                "`prediction_set` / `refer` (see `evaluation.conformal`).", ""]
    return [*unsure_section(sets["coverage_target"], sets["calibration_images"],
                            "validation images (few patients: the coverage is less certain "
                            "than a selection champion's)", sets,
                            f"the {sets.get('n_images')} {evaluation.split} images")[:-1],
            "Every answer of this model (predict, the command line, the served model) carries "
            "`prediction_set` and `refer`.", ""]


def _floor_section(floor: Mapping[str, Any] | None, metrics: Mapping[str, Any]) -> list[str]:
    """The classical floor on the same split, and the model's margin over it."""
    if not floor:
        return []
    if floor.get("skipped"):
        return ["## Classical floor", "", f"Not scored: {floor['skipped']}.", ""]
    ci = floor.get("macro_f1_ci") or {}
    margin = (metrics.get("f1_macro") or 0.0) - (floor.get("f1_macro") or 0.0)
    return ["## Classical floor", "",
            f"{floor.get('model')}, fitted on the same {floor.get('n_train_images')} training "
            f"images in {_fmt(floor.get('seconds'), 1)} s and scored on the same "
            f"{floor.get('n_images')} {floor.get('split')} images: macro-F1 "
            f"**{_fmt(floor.get('f1_macro'))}** (95% interval {_fmt(ci.get('low'))}-"
            f"{_fmt(ci.get('high'))}). This model minus the floor: **{margin:+.3f}** "
            "(one split; `kedro run --pipeline=cross_validate` compares them over folds).", ""]


def build_model_card(
    test_metrics: dict[str, Any], training_history: pd.DataFrame,
    split_summary: pd.DataFrame, record: Preprocessing, model: ModelParams,
    training: TrainingParams, evaluation: EvaluationParams, run_context: Mapping[str, Any],
    floor: Mapping[str, Any] | None = None,
) -> str:
    """The card's Markdown (see the module docstring)."""
    name = run_context.get("model") or model.architecture
    lines = [f"# Model card: {name}", "",
             f"Trained {run_context.get('started', 'n/a')}; Kedro session "
             f"{run_context.get('session_id', 'n/a')}.", "",
             "## Intended use", "", INTENDED_USE, "",
             *_data_section(split_summary, record),
             *_preprocessing_section(record, training),
             *_training_section(model, training, training_history),
             *_metrics_section(test_metrics, evaluation),
             *_floor_section(floor, test_metrics),
             *_calibration_section(test_metrics),
             *_prediction_sets_section(test_metrics, evaluation),
             "## Known limitations", "", *(f"- {item}" for item in LIMITATIONS), "",
             "## Reproduce", "", "```", str(run_context.get("command") or "unknown"), "```", "",
             f"Git commit: `{run_context.get('git_commit') or 'unknown'}`.", ""]
    return "\n".join(lines)


def _fold_data_section(cv_folds: pd.DataFrame, record: Preprocessing) -> list[str]:
    """Images / patient groups per class in each fold and in the outer (never-trained) part."""
    part = [f"fold {int(f)}" if role == "cv" else "outer"
            for role, f in zip(cv_folds["role"], cv_folds["fold"], strict=True)]
    parts = sorted(set(part) - {"outer"}, key=lambda name: int(name.split()[1]))
    parts += ["outer"] if "outer" in part else []
    return ["## Data", "", f"Classes (label order): {', '.join(record.classes)}. Images / "
            "patient groups per fold, each fold holding whole patients (pseudonymised: counts "
            "only); the outer part is never trained on nor used to choose an epoch.", "",
            *_counts_table(count_parts(cv_folds, part), record, parts), ""]


def _interval(value: Any, low: Any, high: Any) -> str:
    return f"{_fmt(value)} [{_fmt(low)}-{_fmt(high)}]"


def _cv_section(summary: pd.DataFrame) -> list[str]:
    """One row per model of the cross-validation summary (the CNN, the floor, their fusion)."""
    rows = []
    for row in summary.to_dict("records"):
        versus = ("" if pd.isna(row.get("vs_floor_mean_diff")) else
                  f"{row['vs_floor_mean_diff']:+.3f} [{_fmt(row['vs_floor_ci_low'])}-"
                  f"{_fmt(row['vs_floor_ci_high'])}], {_fmt(row['wins'], 0)} wins / "
                  f"{_fmt(row['losses'], 0)} losses")
        rows.append([row["model"],
                     f"{_fmt(row['folds_mean'])} ± {_fmt(row['folds_sd'])}",
                     _interval(row["pooled_f1"], row["pooled_ci_low"], row["pooled_ci_high"]),
                     versus or "-",
                     _interval(row.get("outer_ensemble_f1"), row.get("outer_ci_low"),
                               row.get("outer_ci_high")),
                     _fmt(row.get("outer_mean_member"))])
    folds = int(summary["folds"].max()) if len(summary) else 0
    return ["## Cross-validation", "",
            f"{folds} patient-grouped folds: each fold's model was trained on the other folds "
            "and scored on its own (out of fold); the classical floor (colour and texture "
            "statistics + RBF SVM) was fitted on the same folds. Macro-F1: mean ± sd over "
            "folds; pooled out of fold with its patient-bootstrap 95% interval; the paired "
            "difference from the floor over folds; on the outer patients, the fold ensemble "
            "(this card's model) against the mean of its members.", "",
            *_table(["model", "folds mean ± sd", "pooled out of fold", "minus floor",
                     "outer: ensemble", "outer: mean member"], rows), ""]


def build_cv_model_card(
    cv_summary: pd.DataFrame, cv_folds: pd.DataFrame, record: Preprocessing,
    model: ModelParams, training: TrainingParams, run_context: Mapping[str, Any],
) -> str:
    """The card of a cross-validation run's fold ensemble (see the module docstring)."""
    name = f"{run_context.get('model') or model.architecture} fold ensemble"
    lines = [f"# Model card: {name}", "",
             f"Cross-validated {run_context.get('started', 'n/a')}; Kedro session "
             f"{run_context.get('session_id', 'n/a')}.", "",
             "## Intended use", "", INTENDED_USE, "",
             *_fold_data_section(cv_folds, record),
             *_preprocessing_section(record, training),
             *_training_section(model, training, None),
             *_cv_section(cv_summary),
             "## Calibration", "", "Not measured in cross-validation (no temperature is fitted "
             "for the folds); see a training run's card.", "",
             "## Known limitations", "", *(f"- {item}" for item in LIMITATIONS), "",
             "## Reproduce", "", "```", str(run_context.get("command") or "unknown"), "```", "",
             f"Git commit: `{run_context.get('git_commit') or 'unknown'}`.", ""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _html_table(rows: list[str]) -> str:
    cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
    head = "".join(f"<th>{_inline(c)}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>"
                   for row in cells[2:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def markdown_to_html(markdown: str, title: str = "Model card") -> str:
    """HTML of the card's own Markdown subset (headings, tables, lists, code blocks, text)."""
    out, block, lines = [], [], markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = lines.index("```", i + 1) if "```" in lines[i + 1:] else len(lines)
            out.append("<pre><code>" + html.escape("\n".join(lines[i + 1:end])) + "</code></pre>")
            i = end + 1
            continue
        if line.startswith("|"):
            block = [line]
            while i + 1 < len(lines) and lines[i + 1].startswith("|"):
                i += 1
                block.append(lines[i])
            out.append(_html_table(block))
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            out.append(f"<ul><li>{_inline(line[2:])}</li></ul>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:"
             "collapse}td,th{border:1px solid #999;padding:2px 8px}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>\n" + "\n".join(out)
            + "\n</body></html>\n")
