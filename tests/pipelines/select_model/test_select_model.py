"""Model selection on synthetic fold predictions: a deliberately better family wins, the tie
rule prefers the cheaper model when intervals overlap, the hybrid is scored nested, the
winner's prediction sets are calibrated out of fold and checked on the outer patients; bad
candidate lists fail in one line."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from _params import params

from neuroblastoma_cnn.core.errors import ParameterError
from neuroblastoma_cnn.pipelines.select_model.nodes import (
    calibrate_prediction_sets,
    check_candidates,
    choose_winner,
    prediction_set_report,
    select_model,
)

CLASSES = ["A", "B", "C"]


def _folds(n_groups: int = 36, per_group: int = 3) -> pd.DataFrame:
    rows = []
    for g in range(n_groups):
        label = CLASSES[g % 3]
        outer = g >= n_groups - 6
        for i in range(per_group):
            rows.append({"image_path": f"{label}/g{g}_{i}.png", "label": label, "group": f"g{g}",
                         "role": "outer" if outer else "cv", "fold": -1 if outer else g % 4})
    return pd.DataFrame(rows)


def _predictions(folds: pd.DataFrame, model: str, skill: float, seed: int) -> pd.DataFrame:
    """Fold predictions of a model that puts ``skill`` extra logit on the true class."""
    rng = np.random.default_rng(seed)
    parts = []
    for fold in range(4):
        for part, rows in (("held_out", folds[(folds["role"] == "cv") & (folds["fold"] == fold)]),
                           ("outer", folds[folds["role"] == "outer"])):
            logits = rng.normal(0, 1, (len(rows), 3))
            logits[np.arange(len(rows)), [CLASSES.index(c) for c in rows["label"]]] += skill
            prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
            frame = rows[["image_path", "label", "group"]].reset_index(drop=True).assign(
                model=model, fold=fold, set=part)
            for i, c in enumerate(CLASSES):
                frame[f"prob_{c}"] = prob[:, i]
            frame["predicted"] = [CLASSES[i] for i in prob.argmax(axis=1)]
            parts.append(frame)
    return pd.concat(parts, ignore_index=True)


def _select(tie_rule: str, skills: dict[str, float], candidates: list[str]):
    folds = _folds()
    settings = params("select_model", tie_rule=tie_rule, candidates=candidates,
                      bootstrap_samples=200,
                      hybrid={"bases": ["resnet34", "selected_floor"], "inner_folds": 2,
                              "meta": {"logistic": {"C": [0.1, 1.0]}}})
    frames = {name: _predictions(folds, name, skill, seed)
              for seed, (name, skill) in enumerate(skills.items())}
    return select_model(folds, frames["floor"], frames["selected_floor"], settings,
                        resnet34=frames["resnet34"]), settings


def test_a_clearly_better_family_wins_and_gets_calibrated_sets() -> None:
    (table, markdown, predictions, metrics), settings = _select(
        "cheaper", {"floor": 0.2, "selected_floor": 0.5, "resnet34": 4.0},
        ["floor", "selected_floor", "resnet34", "hybrid"])
    assert table["model"].iloc[0] in {"resnet34", "hybrid"}
    assert table.loc[table["chosen"], "model"].tolist() == ["resnet34"]  # cheaper than hybrid
    assert set(table["model"]) == {"floor", "selected_floor", "resnet34", "hybrid"}
    assert table["pooled_ci_low"].le(table["pooled_f1"]).all()
    assert "| resnet34 |" in markdown and "**yes**" in markdown
    assert "resnet34.pooled_f1" in metrics  # logged as select.resnet34.pooled_f1 (prefix)
    # The hybrid's held-out rows: every cross-validated image once (nested out of fold).
    hybrid = predictions[(predictions["model"] == "hybrid") & (predictions["set"] == "held_out")]
    assert hybrid["image_path"].is_unique and len(hybrid) == 30 * 3
    calibration = calibrate_prediction_sets(table, predictions, settings)
    assert calibration["model"] == "resnet34" and calibration["calibration"]["coverage"] == 0.9
    # Checked on the champion's own outer answers (here: the fold models' mean).
    winner = predictions[(predictions["model"] == "resnet34") & (predictions["set"] == "outer")]
    outer = winner.groupby(["image_path", "label", "group"])[
        [f"prob_{c}" for c in CLASSES]].mean().reset_index()
    report, curve, figure, logged = prediction_set_report(calibration, outer)
    assert report["calibration"] == calibration["calibration"]
    assert 0.0 <= report["outer"]["coverage"] <= 1.0 and len(curve) == 18
    assert logged["coverage"]["value"] == report["outer"]["coverage"]
    assert {f"coverage.{c}" for c in CLASSES} <= set(logged)  # conformal.coverage.A ...
    curve_line, point = figure.axes[0].lines  # the curve, and the sets' own operating point
    assert len(curve_line.get_xdata()) == len(curve)
    assert list(point.get_xdata()) == [report["outer"]["referred_share"]]


def test_the_tie_rule_prefers_the_cheaper_model_when_intervals_overlap() -> None:
    table = pd.DataFrame({"model": ["resnet34", "floor"], "pooled_f1": [0.60, 0.55],
                          "pooled_ci_low": [0.45, 0.40], "pooled_ci_high": [0.70, 0.66],
                          "cost": [4, 1]})
    assert choose_winner(table, "cheaper") == "floor"
    assert choose_winner(table, "best") == "resnet34"
    apart = table.assign(pooled_ci_low=[0.58, 0.40], pooled_ci_high=[0.70, 0.50])
    assert choose_winner(apart, "cheaper") == "resnet34"


@pytest.mark.parametrize(("candidates", "message"), [
    (["floor", "resnet43"], r"select_model\.candidates: Unknown model family 'resnet43'"),
    (["floor", "cv_ensemble"], r"'cv_ensemble' cannot be a selection candidate"),
    (["floor", "hybrid"], r"select_model\.hybrid\.bases: \['resnet34', 'selected_floor'\]"),
])
def test_a_bad_candidate_list_is_one_line(candidates, message) -> None:
    with pytest.raises(ParameterError, match=message) as info:
        check_candidates(params("select_model", candidates=candidates))
    assert "\n" not in str(info.value)


def test_resnet50_is_skipped_with_one_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        kept = check_candidates(params("select_model", candidates=["floor", "resnet50"]))
    assert kept == ["floor"]
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "resnet50 skipped" in lines[0]
