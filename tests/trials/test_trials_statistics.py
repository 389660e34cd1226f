"""Study statistics against SciPy and against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from scipy import stats

from neuroblastoma_cnn.trials import statistics as st


def test_mean_interval_by_hand():
    # mean 2, sd 1, t(0.975, 2) = 4.302653: half width 4.302653 / sqrt(3) = 2.484138
    out = st.mean_interval([1.0, 2.0, 3.0])
    assert out["n"] == 3 and out["mean"] == pytest.approx(2.0) and out["sd"] == pytest.approx(1.0)
    assert out["ci_low"] == pytest.approx(2 - 2.484138, abs=1e-6)
    assert out["ci_high"] == pytest.approx(2 + 2.484138, abs=1e-6)


def test_mean_interval_matches_scipy():
    x = np.random.default_rng(1).normal(0.8, 0.05, 7)
    low, high = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    out = st.mean_interval(x)
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((low, high))


def test_mean_interval_small_samples():
    one = st.mean_interval([0.7])
    assert one["n"] == 1 and one["mean"] == 0.7 and math.isnan(one["sd"])
    assert math.isnan(one["ci_low"]) and math.isnan(one["ci_high"])
    assert st.mean_interval([])["n"] == 0
    assert st.mean_interval([0.5, float("nan"), 0.7])["n"] == 2


def test_wilcoxon_exact_by_hand():
    # all three differences positive: W = 0, exact two-sided p = 2 * 1/8
    out = st.paired_comparison([0.6, 0.7, 0.8], [0.5, 0.5, 0.5])
    assert out["p_value"] == pytest.approx(0.25)
    assert out["rank_biserial"] == pytest.approx(1.0)
    assert out["mean_diff"] == pytest.approx(0.2)
    assert (out["wins"], out["losses"], out["n_pairs"]) == (3, 0, 3)
    # d = 1, 2, -3, 4, 5: R- = 3, R+ = 12; subsets of 1..5 summing to <= 3: {}, 1, 2, 3, 1+2
    # -> one-sided 5/32, two-sided 10/32; rank-biserial (12 - 3) / 15
    out = st.paired_comparison([1, 2, -3, 4, 5], [0, 0, 0, 0, 0])
    assert out["wilcoxon_statistic"] == 3
    assert out["p_value"] == pytest.approx(10 / 32)
    assert out["rank_biserial"] == pytest.approx(0.6)


def test_paired_comparison_matches_scipy():
    rng = np.random.default_rng(3)
    base = rng.uniform(0.6, 0.9, 10)
    variant = base + rng.normal(0.02, 0.03, 10)
    out = st.paired_comparison(variant, base)
    ref = stats.wilcoxon(variant - base)
    assert out["p_value"] == pytest.approx(ref.pvalue)
    assert out["wilcoxon_statistic"] == pytest.approx(ref.statistic)
    t = stats.ttest_rel(variant, base).confidence_interval(0.95)
    assert (out["diff_ci_low"], out["diff_ci_high"]) == pytest.approx((t.low, t.high))


def test_paired_comparison_no_difference_and_mismatch():
    out = st.paired_comparison([0.5, 0.6], [0.5, 0.6])
    assert out["p_value"] == 1.0 and math.isnan(out["rank_biserial"])
    assert out["mean_diff"] == 0.0
    with pytest.raises(ValueError, match="differ in length"):
        st.paired_comparison([0.1, 0.2], [0.1])


def test_rank_biserial_ties_and_zeros():
    # zeros are dropped; |d| = 1, 1, 2 -> ranks 1.5, 1.5, 3; R+ = 1.5 + 3, R- = 1.5
    assert st.rank_biserial([1, -1, 2, 0]) == pytest.approx((4.5 - 1.5) / 6)


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, 2 * 0.03, max(0.06, 1 * 0.04)
    assert st.holm([0.04, 0.01, 0.03]) == pytest.approx([0.06, 0.03, 0.06])
    out = st.holm([0.5, float("nan")])
    assert out[0] == 0.5 and math.isnan(out[1])


def _trials() -> pd.DataFrame:
    rows = []
    for r, (a, b, c) in enumerate([(0.70, 0.75, 0.60), (0.72, 0.78, 0.65), (0.68, 0.74, 0.66)]):
        for name, score in (("base", a), ("better", b), ("worse", c)):
            rows.append({"variant": name, "repeat": r, "f1_macro": score,
                         "accuracy": score + 0.01, "f1_X": score + 0.05})
    return pd.DataFrame(rows)


def test_summarize_trials_table():
    table = st.summarize_trials(_trials(), "base", extra_metrics=["accuracy", "f1_X"])
    assert list(table["variant"]) == ["base", "better", "worse"]
    base, better, worse = (table.iloc[i] for i in range(3))
    assert bool(base["baseline"]) and math.isnan(base.get("p_value", float("nan")))
    assert better["mean"] == pytest.approx(np.mean([0.75, 0.78, 0.74]))
    assert better["mean_diff"] == pytest.approx(np.mean([0.05, 0.06, 0.06]))
    assert better["rank_biserial"] == 1.0 and worse["rank_biserial"] == -1.0
    assert better["p_value"] == pytest.approx(0.25)
    assert better["p_holm"] == pytest.approx(0.5)  # two tests, both p = 0.25
    assert better["accuracy_mean"] == pytest.approx(better["mean"] + 0.01)
    assert "f1_X_mean" in table


def test_summary_markdown_and_plot():
    table = st.summarize_trials(_trials(), "base", extra_metrics=["accuracy", "f1_X"])
    text = st.summary_markdown(table, "demo", per_class=["X"])
    assert "**base** (baseline)" in text and "F1 X" in text
    assert "+0.057 [" in text  # better: mean difference with its interval
    fig = st.plot_variants(_trials(), order=["base", "better", "worse"], baseline="base")
    assert isinstance(fig, Figure)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["base", "better", "worse"]
