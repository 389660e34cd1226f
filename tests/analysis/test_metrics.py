"""Evaluation metrics against hand computations and scikit-learn; figures render."""

from __future__ import annotations

import logging
from itertools import product

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from sklearn.metrics import classification_report, cohen_kappa_score, f1_score, roc_auc_score

from neuroblastoma_cnn.analysis.metrics import (
    _macro_f1_from_counts,
    bootstrap_macro_f1,
    classification_metrics,
    classification_report_frame,
    confusion_matrix_frame,
    flatten_metrics,
    plot_confusion_matrix,
    plot_roc_curves,
    plot_training_curves,
)
from neuroblastoma_cnn.analysis.predictions import aggregate_image_probabilities

CLASSES = ["GN", "GNB", "NB"]
# Hand example. Per class: GN tp 2 fp 1 fn 1; GNB tp 1 fp 2 fn 1; NB tp 3 fp 1 fn 2.
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
Y_PRED = np.array([0, 0, 1, 1, 2, 2, 2, 2, 0, 1])
F1 = {"GN": 2 / 3, "GNB": 2 / 5, "NB": 2 / 3}


def _prob_for(pred: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Random probability rows whose argmax is ``pred``."""
    rng = np.random.default_rng(seed)
    prob = rng.uniform(0.0, 1.0, (len(pred), k))
    prob[np.arange(len(pred)), pred] += k
    return prob / prob.sum(axis=1, keepdims=True)


def _pairwise_auc(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """AUC by its definition: P(score of a positive > score of a negative), ties count half."""
    pairs = [(p > n) + 0.5 * (p == n) for p, n in product(positive_scores, negative_scores)]
    return float(np.mean(pairs))


def test_classification_metrics_on_a_hand_made_case() -> None:
    prob = _prob_for(Y_PRED, 3)
    m = classification_metrics(Y_TRUE, prob, CLASSES)
    assert m["n_samples"] == 10
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 3 / 5) / 3)
    assert m["f1_macro"] == pytest.approx(26 / 45)
    assert m["f1_weighted"] == pytest.approx((3 * 2 / 3 + 2 * 2 / 5 + 5 * 2 / 3) / 10)
    assert m["precision_macro"] == pytest.approx((2 / 3 + 1 / 3 + 3 / 4) / 3)
    assert m["recall_macro"] == pytest.approx(m["balanced_accuracy"])
    # Observed agreement 0.6, chance agreement .3*.3 + .2*.3 + .5*.4 = .35.
    assert m["cohen_kappa"] == pytest.approx((0.6 - 0.35) / (1 - 0.35))
    assert m["cohen_kappa"] == pytest.approx(cohen_kappa_score(Y_TRUE, Y_PRED))
    for name, expected in F1.items():
        assert m["per_class"][name]["f1"] == pytest.approx(expected)
    assert [m["per_class"][c]["support"] for c in CLASSES] == [3, 2, 5]
    assert m["per_class"]["GNB"]["precision"] == pytest.approx(1 / 3)
    assert m["per_class"]["NB"]["recall"] == pytest.approx(3 / 5)

    for index, name in enumerate(CLASSES):
        positive = np.equal(Y_TRUE, index)
        expected = _pairwise_auc(prob[positive, index], prob[~positive, index])
        assert m["per_class"][name]["roc_auc"] == pytest.approx(expected)
    assert m["roc_auc_macro"] == pytest.approx(
        roc_auc_score(Y_TRUE, prob, multi_class="ovr", average="macro")
    )


def test_classification_metrics_absent_class_gives_none_auc(caplog) -> None:
    y_true = np.array([0, 0, 1, 1, 1])
    prob = np.array([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4], [0.2, 0.7, 0.1], [0.1, 0.5, 0.4],
                     [0.6, 0.3, 0.1]])
    with caplog.at_level(logging.WARNING):
        m = classification_metrics(y_true, prob, CLASSES)
    assert m["per_class"]["NB"]["roc_auc"] is None
    assert "'NB'" in caplog.text and "no samples" in caplog.text
    auc_gn = _pairwise_auc(prob[:2, 0], prob[2:, 0])
    auc_gnb = _pairwise_auc(prob[2:, 1], prob[:2, 1])
    assert m["roc_auc_macro"] == pytest.approx((auc_gn + auc_gnb) / 2)
    assert m["per_class"]["NB"]["support"] == 0
    pred = prob.argmax(axis=1)  # one NB prediction: a false positive for an absent class
    assert m["f1_macro"] == pytest.approx(
        f1_score(y_true, pred, labels=[0, 1, 2], average="macro", zero_division=0)
    )
    assert not np.isnan(list(flatten_metrics(m).values())).any()


def test_classification_metrics_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"shape \(n_samples, n_classes\) = \(10, 3\)"):
        classification_metrics(Y_TRUE, np.ones((10, 2)) / 2, CLASSES)
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        classification_metrics(np.array([0, 3]), np.ones((2, 3)) / 3, CLASSES)


def test_flatten_metrics_gives_mlflow_names() -> None:
    m = classification_metrics(np.array([0, 1, 1]), _prob_for(np.array([0, 1, 0]), 3),
                               ["a b", "c/d", "e(f)"])
    flat = flatten_metrics(m, prefix="test_")
    assert flat["test_f1_macro"] == m["f1_macro"]
    assert flat["test_f1.a b"] == m["per_class"]["a b"]["f1"]
    assert flat["test_support.c/d"] == 2.0
    assert "test_roc_auc.e_f_" not in flat  # undefined AUC (class absent) left out
    assert "test_recall.e_f_" in flat
    assert all(isinstance(v, float) for v in flat.values())


def test_classification_report_frame_matches_scikit_learn(tmp_path) -> None:
    frame = classification_report_frame(Y_TRUE, Y_PRED, CLASSES)
    assert list(frame.columns) == ["class", "precision", "recall", "f1-score", "support"]
    assert list(frame["class"]) == [*CLASSES, "accuracy", "macro avg", "weighted avg"]
    reference = classification_report(Y_TRUE, Y_PRED, target_names=CLASSES, output_dict=True)
    rows = frame.set_index("class")
    for name in [*CLASSES, "macro avg", "weighted avg"]:
        for column in ("precision", "recall", "f1-score", "support"):
            assert rows.loc[name, column] == pytest.approx(reference[name][column])
    assert rows.loc["accuracy", "f1-score"] == pytest.approx(reference["accuracy"])
    frame.to_csv(tmp_path / "report.csv", index=False)
    assert list(pd.read_csv(tmp_path / "report.csv")["class"])[:3] == CLASSES


def test_confusion_matrix_frames() -> None:
    counts = confusion_matrix_frame(Y_TRUE, Y_PRED, CLASSES, normalize=False)
    assert list(counts.columns) == ["true_label", *CLASSES]
    assert counts[CLASSES].to_numpy().tolist() == [[2, 1, 0], [0, 1, 1], [1, 1, 3]]
    rates = confusion_matrix_frame(Y_TRUE, Y_PRED, CLASSES, normalize=True)
    np.testing.assert_allclose(rates[CLASSES].to_numpy()[2], [0.2, 0.2, 0.6])
    np.testing.assert_allclose(rates[CLASSES].sum(axis=1), 1.0)
    absent = confusion_matrix_frame([0, 1], [0, 0], CLASSES, normalize=True)
    assert absent[CLASSES].to_numpy()[2].tolist() == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------- bootstrap


def test_macro_f1_from_counts_equals_scikit_learn() -> None:
    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(1, 30))
        truth = rng.integers(0, 3, n)
        pred = np.where(rng.random(n) < 0.6, truth, rng.integers(0, 4, n))  # class 3: pred only
        counts = np.zeros((4, 4))
        np.add.at(counts, (truth, pred), 1)
        assert _macro_f1_from_counts(counts) == pytest.approx(
            f1_score(truth, pred, average="macro", zero_division=0)
        )


def _grouped_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Twelve patients of 20 tiles; patient p's predictions are wrong for 3 * (p % 6) tiles."""
    truth, pred, groups = [], [], []
    for patient in range(12):
        labels = np.arange(20) % 3
        wrong = (labels + 1) % 3
        truth.append(labels)
        pred.append(np.where(np.arange(20) < (patient % 6) * 3, wrong, labels))
        groups += [f"P{patient}"] * 20
    return np.concatenate(truth), np.concatenate(pred), np.array(groups)


def test_bootstrap_point_interval_and_determinism() -> None:
    truth, pred, groups = _grouped_case()
    result = bootstrap_macro_f1(truth, pred, groups, n_boot=500, seed=3)
    assert set(result) == {"point", "low", "high", "n_boot", "n_groups"}
    assert result["point"] == pytest.approx(f1_score(truth, pred, average="macro"))
    assert result["low"] < result["point"] < result["high"]
    assert (result["n_boot"], result["n_groups"]) == (500, 12)
    assert bootstrap_macro_f1(truth, pred, groups, n_boot=500, seed=3) == result
    assert bootstrap_macro_f1(truth, pred, groups, n_boot=500, seed=4) != result


def test_bootstrap_resamples_groups_not_rows() -> None:
    truth, pred, groups = _grouped_case()
    # One patient: every group resample is the whole data set, so the interval collapses,
    # whereas resampling rows (each row its own group) varies.
    single = bootstrap_macro_f1(truth, pred, np.zeros(len(truth)), n_boot=300)
    assert single["low"] == single["high"] == pytest.approx(single["point"])
    rows = bootstrap_macro_f1(truth, pred, np.arange(len(truth)), n_boot=300)
    assert rows["high"] - rows["low"] > 0.05
    # Patients differ a lot: the patient-level interval is wider than the row-level one.
    patients = bootstrap_macro_f1(truth, pred, groups, n_boot=300)
    assert patients["high"] - patients["low"] > rows["high"] - rows["low"]
    # All patients perfect: every resample is perfect.
    perfect = bootstrap_macro_f1(truth, truth, groups, n_boot=200)
    assert perfect["low"] == perfect["high"] == perfect["point"] == 1.0


def test_bootstrap_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        bootstrap_macro_f1([0, 1], [0, 1], ["a"])


# ------------------------------------------------------------------------------- aggregation


def test_aggregate_image_probabilities_is_the_tile_mean() -> None:
    tiles = pd.DataFrame({
        "image_path": ["b.png", "a.png", "b.png", "a.png", "a.png"],
        "label": ["NB", "GN", "NB", "GN", "GN"],
        "group": ["P2", "P1", "P2", "P1", "P1"],
        "tile_id": [0, 1, 2, 3, 4],
        "prob_GN": [0.1, 0.9, 0.3, 0.6, 0.3],
        "prob_NB": [0.9, 0.1, 0.7, 0.4, 0.7],
    })
    images = aggregate_image_probabilities(tiles)
    assert list(images.columns) == ["image_path", "label", "group", "n_tiles", "prob_GN",
                                    "prob_NB"]
    assert images["image_path"].tolist() == ["a.png", "b.png"]
    assert images["n_tiles"].tolist() == [3, 2]
    np.testing.assert_allclose(images["prob_GN"], [0.6, 0.2])
    np.testing.assert_allclose(images["prob_NB"], [0.4, 0.8])
    assert images["label"].tolist() == ["GN", "NB"]

    tiles.loc[0, "label"] = "GN"
    with pytest.raises(ValueError, match=r"different labels or groups: \['b.png'\]"):
        aggregate_image_probabilities(tiles)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['group'\]"):
        aggregate_image_probabilities(tiles.drop(columns="group"))


# ------------------------------------------------------------------------------------ figures


def test_figures_render(tmp_path) -> None:
    counts = confusion_matrix_frame(Y_TRUE, Y_PRED, CLASSES, normalize=False)
    rates = confusion_matrix_frame(Y_TRUE, Y_PRED, CLASSES, normalize=True)
    fig = plot_confusion_matrix(counts, rates)
    assert isinstance(fig, Figure)
    heatmaps = [ax for ax in fig.axes if ax.images]
    assert len(heatmaps) == 2
    assert [t.get_text() for t in heatmaps[0].get_yticklabels()] == CLASSES
    assert heatmaps[0].texts[0].get_text() == "2" and heatmaps[1].texts[2 * 3].get_text() == "0.20"

    history = pd.DataFrame({
        "epoch": [1, 2, 3, 4], "stage": ["head", "head", "fine_tune", "fine_tune"],
        "loss": [1.0, 0.8, 0.6, 0.5], "accuracy": [0.5, 0.6, 0.7, 0.8],
        "val_loss": [1.1, 0.9, 0.8, 0.7], "val_accuracy": [0.4, 0.5, 0.6, 0.7],
        "val_macro_f1": [0.3, 0.4, 0.5, 0.6],
    })
    curves = plot_training_curves(history)
    loss_ax, acc_ax = curves.axes
    assert len(loss_ax.get_legend().get_texts()) == 2
    assert len(acc_ax.get_legend().get_texts()) == 3
    assert any(line.get_xdata()[0] == 2.5 for line in loss_ax.get_lines())  # stage change

    roc = plot_roc_curves(Y_TRUE, _prob_for(Y_PRED, 3), CLASSES)
    labels = [t.get_text() for t in roc.axes[0].get_legend().get_texts()]
    assert len(labels) == 3 and all("AUC" in label for label in labels)
    for name, figure in (("cm", fig), ("curves", curves), ("roc", roc)):
        figure.savefig(tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
