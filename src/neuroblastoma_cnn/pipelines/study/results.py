"""A study's results: the trials table, the per-variant summary and the best configuration.

Pure pandas / YAML on the trials table (one row per trial, as ``engine.trial_rows`` makes it),
so the summary is computed the same way whether the trials ran here, in other processes or on
other machines.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import yaml

from neuroblastoma_cnn.trials import statistics as st
from neuroblastoma_cnn.trials.plan import StudyPlan, apply_overrides

METRIC = "f1_macro"


def counted(trials: pd.DataFrame) -> pd.DataFrame:
    """The completed trials the summary counts (one per variant and repeat)."""
    if trials.empty:
        return trials
    return trials[trials["counted"].astype(bool)].reset_index(drop=True)


def class_f1_columns(trials: pd.DataFrame) -> list[str]:
    """Per-class F1 columns (``f1_<class>``), in table order; no class list assumed."""
    return [c for c in trials.columns if str(c).startswith("f1_") and c != METRIC]


def summarize(trials: pd.DataFrame, plan: StudyPlan) -> pd.DataFrame:
    """Per variant: macro-F1 mean, sd, 95% interval, accuracy, per-class F1 and the paired test
    against the baseline (grid); for a search, the complete trials ranked by objective."""
    done = counted(trials)
    if plan.mode == "search":
        keep = ["trial", "objective", METRIC, "accuracy", *plan.space, "seconds",
                "mlflow_run_id"]
        ranked = done.sort_values("objective", ascending=False)
        return ranked[[c for c in keep if c in ranked]].reset_index(drop=True)
    table = st.summarize_trials(done, plan.baseline, METRIC, order=plan.variant_names,
                                extra_metrics=["accuracy", *class_f1_columns(done), "objective"])
    if "diverged" in done:
        table["diverged"] = [int(done.loc[done["variant"] == v, "diverged"].fillna(0).sum())
                             for v in table["variant"]]
    table.insert(0, "study", plan.name)
    overrides = {v.name: v.set for v in plan.variants}
    table.insert(2, "parameters", [", ".join(f"{k}={val}" for k, val in
                                             overrides[name].items()) or "defaults"
                                   for name in table["variant"]])
    return table


def summary_text(trials: pd.DataFrame, summary: pd.DataFrame, plan: StudyPlan,
                 optuna_name: str) -> str:
    """The Markdown report: the table, what was run, and how to read the test."""
    done = counted(trials)
    states = trials["state"].value_counts().to_dict() if not trials.empty else {}
    seconds = pd.to_numeric(done.get("seconds", pd.Series(dtype=float)), errors="coerce")
    lines = [
        f"# Study `{plan.name}` ({plan.mode}, model `{plan.model}`)",
        "",
        f"Optuna study `{optuna_name}` in `{_redact(plan.storage)}`; "
        f"trials by state: {', '.join(f'{k} {v}' for k, v in sorted(states.items()))}; "
        f"median wall time per counted trial {seconds.median():.1f} s "
        f"(total {seconds.sum() / 60:.1f} min).",
        "",
    ]
    if plan.fixed:
        lines += [f"Fixed for every trial: {_pairs(plan.fixed)}.", ""]
    if plan.mode == "grid":
        classes = [c[len("f1_"):] for c in class_f1_columns(done)]
        lines += [
            f"Repeats: {plan.repeats} ({plan.repeat_scheme}); every variant ran on the same "
            "repeats and the same test patients. Scores are test macro-F1 per image.",
            "",
            st.summary_markdown(summary, f"Test macro-F1 per variant ({plan.name})",
                                per_class=classes),
            "Δ: variant minus baseline on the same repeats, mean with its 95% t interval. "
            "Wilcoxon signed-rank, two-sided (Holm-adjusted over the variants in brackets); "
            f"with {plan.repeats} repeats the smallest possible p is "
            f"{2 / 2 ** plan.repeats:.3g}. Rank-biserial: +1 when the variant beats the baseline "
            "on every repeat, -1 when it loses on every one. W/L: repeats won / lost.",
        ]
        if "diverged" in summary and summary["diverged"].sum() > 0:
            lines += ["", "Diverged trials (non-finite outputs, scored as predicting the first "
                      "class): " + ", ".join(f"{r['variant']} {int(r['diverged'])}"
                                             for r in summary.to_dict("records")
                                             if r["diverged"]) + "."]
    else:
        top = summary.head(10)
        lines += [f"Search: {plan.n_trials} trials, TPE sampler, median pruning on validation "
                  "macro-F1 per epoch. Ranked by the objective (best validation macro-F1); test "
                  "macro-F1 is shown but never used to choose.", "",
                  _frame_markdown(top)]
    return "\n".join(lines) + "\n"


def best_overrides(trials: pd.DataFrame, summary: pd.DataFrame, plan: StudyPlan
                   ) -> tuple[dict[str, Any], str]:
    """The winning parameter values and a sentence saying why they won.

    Both choose on validation macro-F1 (the objective), never on the test set: grid, the
    variant with the highest mean objective over the repeats; search, the best trial."""
    if summary.empty:
        return {}, "no completed trials"
    if plan.mode == "grid":
        row = summary.sort_values("objective_mean", ascending=False).iloc[0]
        chosen = plan.variant(str(row["variant"])).set
        why = (f"variant {row['variant']}: mean validation macro-F1 {row['objective_mean']:.3f}"
               f" over {int(row['n'])} repeats; test {row['mean']:.3f}")
        return {**plan.fixed, **chosen}, why
    row = summary.iloc[0]
    chosen = {path: _plain(row[path]) for path in plan.space if path in row}
    why = f"trial {int(row['trial'])}: validation macro-F1 {row['objective']:.3f}"
    return {**plan.fixed, **chosen}, why


def best_parameters_yaml(plan: StudyPlan, overrides: Mapping[str, Any], why: str) -> str:
    """YAML to paste into conf/base/parameters_training.yml (or conf/local/): only the values
    the study set, nested under the model's block."""
    nested: dict[str, Any] = {}
    for path, value in overrides.items():
        node = nested
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _plain(value)
    # Check that every path exists in the model's parameters (apply_overrides would fail).
    apply_overrides(plan.base_params, overrides)
    header = (f"# Best configuration of study '{plan.name}' ({why}).\n"
              f"# Paste into conf/base/parameters_training.yml or conf/local/parameters.yml.\n")
    return header + yaml.safe_dump({plan.model: nested}, sort_keys=False)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value


def _pairs(values: Mapping[str, Any]) -> str:
    return ", ".join(f"`{k}` = {v}" for k, v in values.items())


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def _frame_markdown(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(no completed trials)\n"
    cols = [str(c) for c in frame.columns]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in frame.itertuples(index=False):
        out.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v)
                                     for v in row) + " |")
    return "\n".join(out) + "\n"
