"""Prediction sets: class-conditional split-conformal sets on synthetic probabilities whose
answer is known, their coverage, and the bad calibration inputs (one line each)."""

from __future__ import annotations

import numpy as np
import pytest

from neuroblastoma_cnn.analysis.conformal import (
    ClassConditionalConformal,
    check_coverage,
    risk_coverage,
    set_report,
)
from neuroblastoma_cnn.core.errors import DataError, ParameterError

CLASSES = ["A", "B"]


def _two_class(p_true: np.ndarray, truth: np.ndarray) -> np.ndarray:
    prob = np.empty((len(truth), 2))
    prob[np.arange(len(truth)), truth] = p_true
    prob[np.arange(len(truth)), 1 - truth] = 1 - p_true
    return prob


def test_sets_follow_the_calibration_quantile_exactly() -> None:
    # Class A: 19 calibration images with non-conformity 0.05, 0.10, ... 0.95 (p_true = 1 - a).
    # At coverage 0.9 a class stays in the set while (#{a_cal >= a} + 1) / 20 >= 0.1,
    # i.e. while its non-conformity is at most 0.95; class B is calibrated as confidently.
    alphas = np.arange(1, 20) * 0.05
    truth = np.array([0] * 19 + [1] * 19)
    prob = _two_class(np.concatenate([1 - alphas, 1 - alphas]), truth)
    conformal = ClassConditionalConformal(0.9).fit(prob, np.array(CLASSES)[truth], CLASSES,
                                                   groups=[f"g{i}" for i in range(38)])
    sets = conformal.predict_sets(np.array([[0.97, 0.03], [0.5, 0.5], [0.02, 0.98]]))
    assert sets.tolist() == [[True, False], [True, True], [False, True]]
    columns = conformal.set_columns(np.array([[0.97, 0.03], [0.5, 0.5]]))
    assert columns["prediction_set"].tolist() == ["A", "A|B"]
    assert columns["refer"].tolist() == [False, True]


def test_coverage_holds_per_class_on_exchangeable_synthetic_data() -> None:
    rng = np.random.default_rng(0)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        truth = rng.integers(0, 3, n)
        # Class 2 is hard (its true probability is low), so one threshold for all classes
        # would under-cover it: the Mondrian calibration must hold for it too.
        strength = np.array([4.0, 3.0, 0.6])[truth]
        logits = rng.normal(0, 1, (n, 3))
        logits[np.arange(n), truth] += strength
        prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        return prob, truth

    classes = ["a", "b", "c"]
    prob, truth = draw(1500)
    conformal = ClassConditionalConformal(0.9).fit(prob, np.array(classes)[truth], classes,
                                                   groups=np.arange(1500))
    test_prob, test_truth = draw(6000)
    report = set_report(conformal.predict_sets(test_prob), np.array(classes)[test_truth],
                        classes, np.array(classes)[test_prob.argmax(1)])
    assert 0.88 <= report["coverage"] <= 0.92
    for cls in classes:
        assert 0.87 <= report["coverage_per_class"][cls] <= 0.93, report
    assert 1.0 <= report["mean_set_size"] <= 3.0
    curve = risk_coverage(test_prob, np.array(classes)[test_truth], classes)
    assert curve["accepted_accuracy"].iloc[0] >= curve["accepted_accuracy"].iloc[-1]


@pytest.mark.parametrize("coverage", [0, 1, 1.5, -0.1, "x"])
def test_coverage_outside_the_open_interval_is_one_line(coverage) -> None:
    with pytest.raises(ParameterError, match=r"select_model\.conformal\.coverage = .*between 0 "
                                             r"and 1") as info:
        check_coverage(coverage)
    assert "\n" not in str(info.value)


def test_too_few_calibration_images_or_groups_is_one_line() -> None:
    prob = np.full((10, 2), 0.5)
    with pytest.raises(DataError, match=r"10 images, fewer than select_model\.conformal"
                                        r"\.min_images = 20") as info:
        ClassConditionalConformal(0.9).fit(prob, ["A", "B"] * 5, CLASSES, range(10))
    assert "\n" not in str(info.value)
    prob = np.full((30, 2), 0.5)
    with pytest.raises(DataError, match=r"1 patient group\(s\) for 2 classes") as info:
        ClassConditionalConformal(0.9).fit(prob, ["A", "B"] * 15, CLASSES, ["p1"] * 30)
    assert "\n" not in str(info.value)


def test_the_messages_name_the_parameter_group_of_the_caller() -> None:
    conformal = ClassConditionalConformal(0.9, 20, where="evaluation.conformal")
    assert conformal.shortfall(19, range(19), 2) == (
        "19 images, fewer than evaluation.conformal.min_images = 20")
    assert conformal.shortfall(20, ["p"] * 20, 2).startswith("1 patient group(s) for 2 classes")
    assert conformal.shortfall(20, ["p", "q"] * 10, 2) is None
    with pytest.raises(ParameterError, match=r"evaluation\.conformal\.coverage = 1"):
        ClassConditionalConformal(1, where="evaluation.conformal")
