"""Calibration maths: ECE by hand, a known temperature recovered, T applied to a model's
outputs, and the record's optional temperature (old records without it still load)."""

from __future__ import annotations

import numpy as np
import pytest
from _params import store_metadata

from neuroblastoma_cnn.analysis.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
)
from neuroblastoma_cnn.analysis.predictions import model_probabilities
from neuroblastoma_cnn.core.errors import DataError
from neuroblastoma_cnn.images.preprocessing import Preprocessing


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_ece_equals_a_hand_computation():
    # Confidences 0.95 (bin (14/15, 1]), 0.9 (bin (13/15, 14/15]), 0.58 and 0.55 (both in
    # (8/15, 9/15] = (0.533, 0.6]); correct: yes, no, yes, no.
    prob = np.array([[0.95, 0.05], [0.9, 0.1], [0.42, 0.58], [0.55, 0.45]])
    y = np.array([0, 1, 1, 1])
    # |1 - 0.95| = 0.05 and |0 - 0.9| = 0.9, weight 1/4 each; the shared bin: accuracy 0.5,
    # mean confidence 0.565, gap 0.065, weight 2/4.
    expected = 0.25 * 0.05 + 0.25 * 0.9 + 0.5 * 0.065
    assert expected_calibration_error(y, prob) == pytest.approx(expected, abs=1e-12)
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error([0, 1], perfect) == pytest.approx(0.0)


def test_ece_refuses_mismatched_input_in_one_line():
    with pytest.raises(DataError, match="one probability row per label"):
        expected_calibration_error([0, 1, 1], np.full((2, 2), 0.5))


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_temperature_fit_recovers_a_known_temperature(true_t):
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, (4000, 3))
    y = np.array([rng.choice(3, p=p) for p in _softmax(logits)])  # calibrated at T = 1 ...
    seen = _softmax(logits * true_t)  # ... a model whose logits are T times too large
    # Hand the fit the model's softmax output: it must find T back from probabilities alone.
    assert fit_temperature(seen, y) == pytest.approx(true_t, rel=0.08)


def test_temperature_is_fitted_on_image_means_of_tiles():
    rng = np.random.default_rng(1)
    logits = rng.normal(0.0, 2.0, (600, 2))
    y_tiles = np.array([rng.choice(2, p=p) for p in _softmax(logits)])
    index = np.arange(600)  # one tile per image: the same as the plain fit
    assert fit_temperature(_softmax(logits), y_tiles, index) == pytest.approx(
        fit_temperature(_softmax(logits), y_tiles))


def test_predictions_with_a_temperature_are_softmax_of_log_p_over_t():
    prob = np.array([[0.7, 0.2, 0.1], [0.05, 0.9, 0.05]])
    expected = _softmax(np.log(prob) / 2.0)
    assert np.allclose(apply_temperature(prob, 2.0), expected)
    assert np.array_equal(apply_temperature(prob, None), prob)
    assert (apply_temperature(prob, 2.0).argmax(1) == prob.argmax(1)).all()  # same classes
    # Undone exactly by 1/T (evaluation recovers the raw outputs of a scaled model this way).
    assert np.allclose(apply_temperature(apply_temperature(prob, 2.0), 0.5), prob)

    class Model:
        preprocessing = _record().with_temperature(2.0)

    assert np.allclose(model_probabilities(Model(), prob.astype(np.float32)), expected,
                       atol=1e-6)
    Model.preprocessing = _record()
    assert np.allclose(model_probabilities(Model(), prob), prob)


def _record() -> Preprocessing:
    return Preprocessing.from_metadata(store_metadata(["a", "b", "c"], 32), "test").model_copy(
        update={"architecture": "resnet34"})


def test_a_record_with_a_temperature_round_trips_and_an_old_one_loads():
    record = _record().with_temperature(1.7)
    again = Preprocessing.from_dict(record.to_dict())
    assert again == record and again.temperature == 1.7
    old = _record().to_dict()
    assert "temperature" not in old  # written as before calibration existed (same bytes)
    assert Preprocessing.from_dict(old).temperature is None
    with pytest.raises(Exception, match="temperature"):
        Preprocessing.from_dict({**old, "temperature": -1.0})
