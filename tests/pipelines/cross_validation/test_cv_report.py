"""The cross-validation report on hand-made prediction frames: per fold, pooled out of fold,
paired against the floor, the ``<model>+floor`` mean, the fold ensemble on the outer patients
and the MLflow metric names. Pure pandas/NumPy, checked against scikit-learn and SciPy."""

from __future__ import annotations

import math
import posixpath
import re

import numpy as np
import pandas as pd
import pytest
from _params import params
from matplotlib.figure import Figure
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score

from neuroblastoma_cnn.analysis import metrics as m
from neuroblastoma_cnn.pipelines.cross_validation import report as cr
from neuroblastoma_cnn.pipelines.cross_validation.nodes import (
    HELD_OUT_SET,
    OUTER_SET,
    PREDICTION_KEYS,
)

CLASSES = ["a b", "c-3", "Zeta"]
PROBS = [f"prob_{c}" for c in CLASSES]
K = 3
MODEL = "resnet34"
VS_FLOOR = ["vs_floor_pooled", "vs_floor_mean_diff", "vs_floor_ci_low", "vs_floor_ci_high",
            "wins", "losses", "p_value"]
#: What MLflow accepts in a metric name on every platform.
MLFLOW_NAME = re.compile(r"^[A-Za-z0-9_\-./ ]+$")


def _evaluation():
    return params("evaluation", bootstrap_samples=200, seed=3)


def _cv_params(**overrides):
    return params("cross_validation", n_folds=K, **overrides)


def image_table(groups_per_class: int = 2, images_per_group: int = 2,
                outer_groups_per_class: int = 2) -> pd.DataFrame:
    """image_path, label, group, fold (-1: outer) of a small cross-validation."""
    rows = []
    for c, label in enumerate(CLASSES):
        for fold in range(K):
            for g in range(groups_per_class):
                group = f"f{fold}c{c}g{g}"
                rows += [{"image_path": f"{label}/{group}/{i}.png", "label": label,
                          "group": group, "fold": fold} for i in range(images_per_group)]
        for g in range(outer_groups_per_class):
            group = f"outer-c{c}g{g}"
            rows += [{"image_path": f"{label}/{group}/{i}.png", "label": label,
                      "group": group, "fold": -1} for i in range(images_per_group)]
    return pd.DataFrame(rows)


def _noisy(labels: pd.Series, rng: np.random.Generator) -> np.ndarray:
    """Probabilities that are right more often than not, but not always."""
    truth = labels.map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    logits = rng.normal(0, 1.0, (len(labels), len(CLASSES)))
    logits[np.arange(len(labels)), truth] += 1.0
    prob = np.exp(logits)
    return prob / prob.sum(axis=1, keepdims=True)


def predictions(model: str, seed: int, images: pd.DataFrame | None = None) -> pd.DataFrame:
    """A fold run's prediction frame: each folded image once (held out by its fold), each
    outer image once per fold model."""
    images = image_table() if images is None else images
    rng = np.random.default_rng(seed)
    folded = images[images["fold"] >= 0]
    outer = images[images["fold"] < 0]
    parts = [folded.assign(set=HELD_OUT_SET)]
    parts += [outer.assign(fold=k, set=OUTER_SET) for k in range(K)]
    frame = pd.concat(parts, ignore_index=True).assign(model=model)
    frame[PROBS] = _noisy(frame["label"], rng)
    return _with_predicted(frame[PREDICTION_KEYS + PROBS])


def _with_predicted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(predicted=[CLASSES[i] for i in frame[PROBS].to_numpy().argmax(axis=1)])


def _set_onehot(frame: pd.DataFrame, rows: pd.Series, classes: pd.Series, high: float = 0.9
                ) -> None:
    """Rows ``rows`` predict ``classes`` (one name per row) with probability ``high``."""
    rest = (1 - high) / (len(CLASSES) - 1)
    for col, name in zip(PROBS, CLASSES, strict=True):
        frame.loc[rows, col] = np.where(classes[rows] == name, high, rest)


def _f1(part: pd.DataFrame) -> float:
    pred = np.asarray(CLASSES)[part[PROBS].to_numpy().argmax(axis=1)]
    return float(f1_score(part["label"], pred, average="macro"))


def _trials(val: dict[int, float] | None = None) -> pd.DataFrame:
    val = val or {k: 0.5 for k in range(K)}
    # rows deliberately not in fold order
    return pd.DataFrame({"fold": list(val), "val_macro_f1": list(val.values())}).iloc[::-1]


def _floor_beaten_on_two_folds() -> tuple[pd.DataFrame, pd.DataFrame]:
    """The CNN right on every held-out image of folds 0 and 1, the floor on fold 2."""
    cnn, floor = predictions(MODEL, 1), predictions(cr.FLOOR, 2)
    assert cnn[PREDICTION_KEYS[1:]].equals(floor[PREDICTION_KEYS[1:]])
    held = cnn["set"] == HELD_OUT_SET
    _set_onehot(cnn, held & cnn["fold"].isin([0, 1]), cnn["label"])
    _set_onehot(floor, held & (floor["fold"] == 2), floor["label"])
    for frame, fold in ((cnn, 2), (floor, 0), (floor, 1)):  # the noisy side is not perfect
        assert _f1(frame[held & (frame["fold"] == fold)]) < 1.0
    return _with_predicted(cnn), _with_predicted(floor)


# ------------------------------------------------------------------------------- scores


def test_scores_match_scikit_learn():
    frame = predictions(MODEL, 0)
    held = frame[frame["set"] == HELD_OUT_SET]
    out = cr._scores(held, CLASSES, _evaluation())
    pred = np.asarray(CLASSES)[held[PROBS].to_numpy().argmax(axis=1)]
    assert out["f1_macro"] == pytest.approx(f1_score(held["label"], pred, average="macro"))
    assert out["accuracy"] == pytest.approx(accuracy_score(held["label"], pred))
    assert 0 < out["f1_macro"] < 1
    assert out["n_images"] == len(held) and out["n_groups"] == held["group"].nunique()
    assert out["ci_low"] <= out["f1_macro"] <= out["ci_high"]
    index = {c: i for i, c in enumerate(CLASSES)}
    ci = m.bootstrap_macro_f1(held["label"].map(index), [index[p] for p in pred],
                              held["group"], n_boot=200, seed=3)  # whole groups resampled
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((ci["low"], ci["high"]))


def test_classes_follow_the_probability_columns():
    assert cr._classes(predictions(MODEL, 0)) == CLASSES


def test_fold_metrics_one_row_per_model_and_fold():
    frame = predictions(MODEL, 0)
    per_fold = cr.fold_metrics({MODEL: frame}, CLASSES, _evaluation())
    assert list(per_fold["model"]) == [MODEL] * K and list(per_fold["fold"]) == [0, 1, 2]
    for row in per_fold.to_dict("records"):
        part = frame[(frame["set"] == HELD_OUT_SET) & (frame["fold"] == row["fold"])]
        assert row["f1_macro"] == pytest.approx(_f1(part))  # outer rows do not count
        assert row["n_images"] == len(part) == 12


# ------------------------------------------------------------------------- candidates


def test_model_plus_floor_is_the_mean_of_the_two():
    cnn, floor = predictions(MODEL, 0), predictions(cr.FLOOR, 1)
    models = cr.candidates(cnn, floor)
    assert list(models) == [MODEL, cr.FLOOR, f"{MODEL}+floor"]
    fused = models[f"{MODEL}+floor"]
    assert len(fused) == len(cnn) and (fused["model"] == f"{MODEL}+floor").all()
    keys = ["fold", "set", "image_path"]
    joined = cnn.merge(floor, on=keys, suffixes=("_c", "_f")).merge(fused, on=keys)
    assert len(joined) == len(cnn)
    for col in PROBS:
        np.testing.assert_allclose(joined[col], (joined[f"{col}_c"] + joined[f"{col}_f"]) / 2)


def test_no_floor_no_candidates_beyond_the_model():
    cnn = predictions(MODEL, 0)
    models = cr.candidates(cnn, pd.DataFrame(columns=PREDICTION_KEYS))
    assert list(models) == [MODEL]


# --------------------------------------------------------------------------- summary


def test_summary_pooled_and_per_fold():
    cnn, floor = predictions(MODEL, 0), predictions(cr.FLOOR, 1)
    models = cr.candidates(cnn, floor)
    per_fold = cr.fold_metrics(models, CLASSES, _evaluation())
    weights = cr.ensemble_weights(_trials(), _cv_params())
    summary = cr.summary_table(models, per_fold, CLASSES, weights, _evaluation()).set_index(
        "model")
    assert list(summary.index) == [MODEL, cr.FLOOR, f"{MODEL}+floor"]
    for name, frame in models.items():
        held = frame[frame["set"] == HELD_OUT_SET]
        row = summary.loc[name]
        assert row["pooled_f1"] == pytest.approx(_f1(held))
        pred = np.asarray(CLASSES)[held[PROBS].to_numpy().argmax(axis=1)]
        assert row["pooled_accuracy"] == pytest.approx(accuracy_score(held["label"], pred))
        assert row["images"] == len(held) == 36
        folds = [_f1(held[held["fold"] == k]) for k in range(K)]
        assert row["folds"] == K
        assert row["folds_mean"] == pytest.approx(np.mean(folds))
        assert row["folds_sd"] == pytest.approx(np.std(folds, ddof=1))
        assert row["pooled_ci_low"] <= row["pooled_f1"] <= row["pooled_ci_high"]
    assert summary.loc[cr.FLOOR, VS_FLOOR].isna().all()  # the floor is not paired with itself


def test_pooled_macro_f1_is_not_the_mean_of_folds():
    # three folds of different sizes: the pooled score is over all rows, not over folds
    images = image_table()
    images = images[~((images["fold"] == 0) & (images["group"].str.endswith("g1")))]
    cnn = predictions(MODEL, 5, images)
    summary = cr.summarize_cross_validation(cnn, pd.DataFrame(columns=PREDICTION_KEYS),
                                            _trials(), _evaluation(), _cv_params())[0]
    held = cnn[cnn["set"] == HELD_OUT_SET]
    pooled = f1_score(held["label"], held["predicted"], average="macro")
    assert summary.loc[0, "pooled_f1"] == pytest.approx(pooled)
    assert summary.loc[0, "images"] == len(held)


def test_paired_comparison_with_the_floor():
    cnn, floor = _floor_beaten_on_two_folds()
    summary, per_fold, report, *_ = cr.summarize_cross_validation(
        cnn, floor, _trials(), _evaluation(), _cv_params())
    row = summary.set_index("model").loc[MODEL]
    held_c = cnn[cnn["set"] == HELD_OUT_SET]
    held_f = floor[floor["set"] == HELD_OUT_SET]
    diffs = np.array([_f1(held_c[held_c["fold"] == k]) - _f1(held_f[held_f["fold"] == k])
                      for k in range(K)])
    assert (diffs[:2] > 0).all() and diffs[2] < 0
    assert (row["wins"], row["losses"]) == (2, 1)
    assert row["vs_floor_mean_diff"] == pytest.approx(diffs.mean())
    low, high = stats.t.interval(0.95, K - 1, loc=diffs.mean(), scale=stats.sem(diffs))
    assert (row["vs_floor_ci_low"], row["vs_floor_ci_high"]) == pytest.approx((low, high))
    assert row["p_value"] == pytest.approx(stats.wilcoxon(diffs).pvalue)
    assert row["vs_floor_pooled"] == pytest.approx(_f1(held_c) - _f1(held_f))
    wide = per_fold.pivot_table(index="fold", columns="model", values="f1_macro")
    np.testing.assert_allclose(wide[MODEL] - wide[cr.FLOOR], diffs)
    assert "2/1" in report


def test_without_floor_rows_nothing_is_paired():
    cnn = predictions(MODEL, 0)
    summary, per_fold, report, counts, figure, flat = cr.summarize_cross_validation(
        cnn, pd.DataFrame(columns=PREDICTION_KEYS), _trials(), _evaluation(), _cv_params())
    assert list(summary["model"]) == [MODEL]
    assert set(per_fold["model"]) == {MODEL}
    present = [c for c in VS_FLOOR if c in summary]
    assert summary[present].isna().all().all()
    assert not any("floor" in key for key in flat)
    row = next(line for line in report.splitlines() if line.startswith(f"| {MODEL} |"))
    assert row.split(" | ")[3] == "-"  # the "vs floor" cell
    assert isinstance(figure, Figure)
    assert int(counts.drop(columns=m.TRUE_LABEL).to_numpy().sum()) == 36


# ------------------------------------------------------------------------------ outer


def test_outer_ensemble_with_equal_weights():
    cnn = predictions(MODEL, 0)
    outer = cnn[cnn["set"] == OUTER_SET]
    weights = cr.ensemble_weights(_trials(), _cv_params())
    assert weights == pytest.approx({0: 1 / 3, 1: 1 / 3, 2: 1 / 3})
    out = cr.outer_scores(cnn, CLASSES, weights, _evaluation())
    mean = outer.groupby("image_path")[[*PROBS]].mean()
    labels = outer.groupby("image_path")["label"].first()
    expected = f1_score(labels, np.asarray(CLASSES)[mean.to_numpy().argmax(axis=1)],
                        average="macro")
    members = [_f1(outer[outer["fold"] == k]) for k in range(K)]
    assert out["outer_ensemble_f1"] == pytest.approx(expected)
    assert out["outer_mean_member"] == pytest.approx(np.mean(members))
    assert out["outer_sd_member"] == pytest.approx(np.std(members, ddof=1))
    assert out["outer_gain"] == pytest.approx(expected - np.mean(members))
    assert out["outer_images"] == outer["image_path"].nunique() == 12
    assert out["outer_groups"] == outer["group"].nunique() == 6
    assert out["outer_ci_low"] <= out["outer_ensemble_f1"] <= out["outer_ci_high"]


def _one_good_member() -> pd.DataFrame:
    """On the outer patients fold 0's model is right, folds 1 and 2 agree on a wrong class."""
    cnn = predictions(MODEL, 0)
    outer = cnn["set"] == OUTER_SET
    wrong = cnn["label"].map({c: CLASSES[(i + 1) % len(CLASSES)] for i, c in enumerate(CLASSES)})
    _set_onehot(cnn, outer & (cnn["fold"] == 0), cnn["label"])
    _set_onehot(cnn, outer & (cnn["fold"] > 0), wrong)
    return _with_predicted(cnn)


def test_outer_ensemble_with_validation_weights():
    cnn = _one_good_member()
    trials = _trials({0: 0.9, 1: 0.1, 2: 0.2})
    equal = cr.ensemble_weights(trials, _cv_params())
    by_validation = cr.ensemble_weights(trials, _cv_params(ensemble={"weights": "validation"}))
    assert by_validation == pytest.approx({0: 0.75, 1: 0.1 / 1.2, 2: 0.2 / 1.2})
    outer = cnn[cnn["set"] == OUTER_SET]
    w = outer["fold"].map(by_validation).to_numpy()[:, None]
    mean = (pd.DataFrame(outer[PROBS].to_numpy() * w, index=outer["image_path"])
            .groupby(level=0).sum())
    labels = outer.groupby("image_path")["label"].first()
    expected = f1_score(labels, np.asarray(CLASSES)[mean.to_numpy().argmax(axis=1)],
                        average="macro")
    assert expected == 1.0
    weighted = cr.outer_scores(cnn, CLASSES, by_validation, _evaluation())
    plain = cr.outer_scores(cnn, CLASSES, equal, _evaluation())
    assert weighted["outer_ensemble_f1"] == pytest.approx(1.0)
    assert plain["outer_ensemble_f1"] == pytest.approx(0.0)
    for out in (weighted, plain):  # members are the same whatever the weights
        assert out["outer_mean_member"] == pytest.approx(1 / 3)
        assert out["outer_gain"] == pytest.approx(out["outer_ensemble_f1"] - 1 / 3)
    summary = cr.summarize_cross_validation(
        cnn, pd.DataFrame(columns=PREDICTION_KEYS), trials, _evaluation(),
        _cv_params(ensemble={"weights": "validation"}))[0]
    assert summary.loc[0, "outer_ensemble_f1"] == pytest.approx(1.0)
    assert summary.loc[0, "outer_gain"] == pytest.approx(2 / 3)


def test_no_outer_rows_no_outer_scores():
    cnn = predictions(MODEL, 0)
    held = cnn[cnn["set"] == HELD_OUT_SET]
    assert cr.outer_scores(held, CLASSES, {0: 1.0}, _evaluation()) == {}
    summary = cr.summarize_cross_validation(held, pd.DataFrame(columns=PREDICTION_KEYS),
                                            _trials(), _evaluation(), _cv_params())[0]
    assert "outer_ensemble_f1" not in summary or summary["outer_ensemble_f1"].isna().all()


# ----------------------------------------------------------------------------- MLflow


def test_mlflow_metric_names_are_accepted():
    cnn, floor = _floor_beaten_on_two_folds()
    summary, *_, flat = cr.summarize_cross_validation(cnn, floor, _trials(), _evaluation(),
                                                      _cv_params())
    assert flat
    for name, entry in flat.items():
        assert MLFLOW_NAME.match(name), name
        assert posixpath.normpath(name) == name, name  # MLflow refuses names that move paths
        assert entry["step"] == 0 and math.isfinite(entry["value"])
    models = {name.split(".")[1] for name in flat}
    assert models == {MODEL, cr.FLOOR, f"{MODEL}_plus_floor"}
    by_model = summary.set_index("model")
    assert flat[f"cv.{MODEL}_plus_floor.pooled_f1"]["value"] == pytest.approx(
        by_model.loc[f"{MODEL}+floor", "pooled_f1"])
    assert flat[f"cv.{MODEL}.wins"]["value"] == 2
    assert flat[f"cv.{MODEL}.outer_ensemble_f1"]["value"] == pytest.approx(
        by_model.loc[MODEL, "outer_ensemble_f1"])
