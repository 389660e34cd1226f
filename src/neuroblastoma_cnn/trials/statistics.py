"""Statistics of a study: per-variant summaries over repeats and paired tests against baseline.

Why these: a study has few repeats (3-10), so the interval of a mean uses Student's t, not a
normal approximation, and the comparison of a variant with the baseline is *paired* (both ran on
the same repeats), which removes the repeat-to-repeat variation the two share. The Wilcoxon
signed-rank test assumes nothing about the shape of the differences; its effect size is the
matched-pairs rank-biserial correlation (+1: the variant wins on every repeat). With n pairs the
exact two-sided p-value cannot go below 2 / 2**n (0.25 for 3 repeats, 0.0625 for 5): a small
study cannot be 'significant', and the table shows the mean difference with its interval so
that the size of an effect is visible anyway. Holm's correction covers testing several
variants against one baseline.

Pure NumPy / SciPy / pandas / matplotlib; no Kedro, no Optuna.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

CONFIDENCE = 0.95


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, float]:
    """n, mean, sample sd and the t-based interval of the mean (NaN where n is too small)."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    n = len(x)
    nan = float("nan")
    if n == 0:
        return {"n": 0, "mean": nan, "sd": nan, "ci_low": nan, "ci_high": nan}
    mean = float(x.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "sd": nan, "ci_low": nan, "ci_high": nan}
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half}


def rank_biserial(differences: Sequence[float]) -> float:
    """Matched-pairs rank-biserial correlation: (R+ - R-) / (R+ + R-), from the ranks of the
    non-zero |differences| (average ranks for ties); NaN when every difference is zero."""
    d = np.asarray(differences, dtype=float)
    d = d[np.isfinite(d) & (d != 0)]
    if len(d) == 0:
        return float("nan")
    ranks = stats.rankdata(np.abs(d))
    plus, minus = ranks[d > 0].sum(), ranks[d < 0].sum()
    return float((plus - minus) / (plus + minus))


def paired_comparison(variant: Sequence[float], baseline: Sequence[float],
                      confidence: float = CONFIDENCE) -> dict[str, float]:
    """Variant minus baseline on the same repeats: mean difference with its t interval,
    Wilcoxon signed-rank p-value (two-sided) and the rank-biserial effect size."""
    a = np.asarray(variant, dtype=float)
    b = np.asarray(baseline, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"Paired samples differ in length: {a.shape} vs {b.shape}.")
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    summary = mean_interval(d, confidence)
    nonzero = d[d != 0]
    if len(nonzero) == 0:
        statistic, p_value = (float("nan"), 1.0) if len(d) else (float("nan"), float("nan"))
    else:
        result = stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided")
        statistic, p_value = float(result.statistic), float(result.pvalue)
    return {
        "n_pairs": len(d),
        "mean_diff": summary["mean"],
        "diff_ci_low": summary["ci_low"],
        "diff_ci_high": summary["ci_high"],
        "wilcoxon_statistic": statistic,
        "p_value": p_value,
        "rank_biserial": rank_biserial(d),
        "wins": int((d > 0).sum()),
        "losses": int((d < 0).sum()),
    }


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and does not count as a test)."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(len(p), np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = len(idx)
    running = 0.0
    for rank, i in enumerate(idx[np.argsort(p[idx], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def summarize_trials(
    trials: pd.DataFrame,
    baseline: str | None,
    metric: str = "f1_macro",
    order: Sequence[str] | None = None,
    extra_metrics: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per variant: mean, sd and 95% interval of ``metric`` over repeats, the means of
    the other metrics (accuracy, per-class F1: every ``extra_metrics`` column), and the paired
    comparison with the baseline on the repeats both completed.

    ``trials`` has one row per completed trial with columns ``variant``, ``repeat`` and the
    metrics.
    """
    if trials.empty:
        raise ValueError("No completed trials to summarise.")
    order = list(order) if order is not None else list(dict.fromkeys(trials["variant"]))
    extra = [c for c in (extra_metrics or []) if c in trials and c != metric]
    by_repeat = trials.pivot_table(index="repeat", columns="variant", values=metric,
                                   aggfunc="first")
    rows: list[dict[str, Any]] = []
    for name in order:
        part = trials[trials["variant"] == name]
        if part.empty:
            continue
        row: dict[str, Any] = {"variant": name, "baseline": name == baseline}
        row.update(mean_interval(part[metric]))
        for column in extra:
            values = part[column].to_numpy(dtype=float)
            row[f"{column}_mean"] = float(np.nanmean(values)) if np.isfinite(values).any() else \
                float("nan")
            row[f"{column}_sd"] = float(np.nanstd(values, ddof=1)) if \
                np.isfinite(values).sum() > 1 else float("nan")
        if baseline is not None and name != baseline and baseline in by_repeat:
            pair = by_repeat[[name, baseline]].dropna()
            row.update(paired_comparison(pair[name], pair[baseline]))
        rows.append(row)
    table = pd.DataFrame(rows)
    if "p_value" in table:
        table["p_holm"] = holm(table["p_value"].tolist())
    return table


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def summary_markdown(
    summary: pd.DataFrame,
    title: str,
    metric_label: str = "Macro-F1",
    per_class: Sequence[str] = (),
) -> str:
    """The summary as a Markdown table that reads like the study's own tables, plus the
    interval and the paired test: Variant | n | Macro-F1 mean ± sd [95% CI] | Accuracy | per
    class F1 | difference to baseline [95% CI] | Wilcoxon p (Holm) | rank-biserial."""
    head = ["Variant", "n", f"{metric_label} mean ± sd", "95% CI", "Accuracy"]
    head += [f"F1 {c}" for c in per_class]
    head += ["Δ vs baseline [95% CI]", "Wilcoxon p (Holm)", "Rank-biserial", "W/L"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for r in summary.to_dict("records"):
        name = f"**{r['variant']}** (baseline)" if r.get("baseline") else str(r["variant"])
        cells = [
            name, str(int(r["n"])), f"{_fmt(r['mean'])} ± {_fmt(r['sd'])}",
            f"{_fmt(r['ci_low'])}-{_fmt(r['ci_high'])}",
            f"{_fmt(r.get('accuracy_mean'))} ± {_fmt(r.get('accuracy_sd'))}",
        ]
        cells += [_fmt(r.get(f"f1_{c}_mean")) for c in per_class]
        if r.get("baseline") or "mean_diff" not in r or r.get("n_pairs") is None or \
                (isinstance(r.get("n_pairs"), float) and not math.isfinite(r["n_pairs"])):
            cells += ["-", "-", "-", "-"]
        else:
            cells += [
                f"{r['mean_diff']:+.3f} [{_fmt(r['diff_ci_low'])}, {_fmt(r['diff_ci_high'])}]",
                f"{_fmt(r['p_value'])} ({_fmt(r.get('p_holm'))})",
                _fmt(r["rank_biserial"], 2),
                f"{int(r['wins'])}/{int(r['losses'])}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_variants(trials: pd.DataFrame, metric: str = "f1_macro",
                  order: Sequence[str] | None = None, baseline: str | None = None,
                  title: str = "", ylabel: str = "test macro-F1") -> Figure:
    """Box plot of ``metric`` per variant with every repeat drawn as a point (the same repeat
    joined across variants by a faint line, since the comparison is paired)."""
    order = list(order) if order is not None else list(dict.fromkeys(trials["variant"]))
    order = [v for v in order if (trials["variant"] == v).any()]
    fig = Figure(figsize=(max(4.0, 1.3 * len(order) + 1.5), 4.0))
    ax = fig.add_subplot(1, 1, 1)
    data = [trials.loc[trials["variant"] == v, metric].to_numpy(dtype=float) for v in order]
    box = ax.boxplot(data, positions=range(len(order)), widths=0.5, showfliers=False,
                     patch_artist=True)
    for patch, name in zip(box["boxes"], order, strict=True):
        patch.set_facecolor("#fde0c5" if name == baseline else "#dbe9f6")
    wide = trials.pivot_table(index="repeat", columns="variant", values=metric, aggfunc="first")
    wide = wide.reindex(columns=order)
    for _, row in wide.iterrows():
        ax.plot(range(len(order)), row.to_numpy(dtype=float), color="0.6", lw=0.6, alpha=0.6,
                zorder=1)
    rng = np.random.default_rng(0)
    for i, values in enumerate(data):
        ax.scatter(i + rng.uniform(-0.08, 0.08, len(values)), values, s=18, color="#1f4e79",
                   zorder=3)
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels(order, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
