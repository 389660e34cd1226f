"""Prediction sets of a single training run: calibrated on the validation images as the saved
model outputs them (after its temperature, an image the mean of its tiles), stored in the
record before the model is saved, reported on the test images; too few validation images give
a warning and a model without sets, never a failed run."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from _params import params
from test_evaluation_calibration import setup  # noqa: F401  (the fixture: 40 + 40 images)

from neuroblastoma_cnn.analysis.calibration import apply_temperature
from neuroblastoma_cnn.analysis.conformal import add_prediction_sets
from neuroblastoma_cnn.analysis.model_card import build_model_card
from neuroblastoma_cnn.analysis.predictions import aggregate_image_probabilities
from neuroblastoma_cnn.images.preprocessing import Preprocessing
from neuroblastoma_cnn.pipelines.evaluation import nodes

PROB = ["prob_a", "prob_b"]


def _card(metrics: dict) -> str:
    from _params import store_metadata  # noqa: PLC0415

    record = Preprocessing.from_metadata(store_metadata(["a", "b"], 16), "t")
    summary = pd.DataFrame({"split": ["test"] * 2, "label": ["a", "b"], "groups": [1, 1],
                            "images": [1, 1], "tiles": [1, 1]})
    return build_model_card(metrics, pd.DataFrame(), summary, record, params("resnet34.model"),
                            params("resnet34.training"), params("evaluation"), {})


@pytest.mark.parametrize("scaling", [False, True])
def test_sets_calibrated_on_served_validation_images_and_stored(setup, scaling):  # noqa: F811
    model, store, split = setup
    evaluation = params("evaluation", temperature_scaling=scaling, bootstrap_samples=20)
    raw = nodes.predict_split_tiles(model, store, split,
                                    evaluation.model_copy(update={"split": "validation"}))
    model, calibration, _ = nodes.calibrate_model(model, store, split, evaluation)
    sets = calibration["prediction_sets"]
    assert sets["attached"] is True and sets["coverage_target"] == 0.9
    assert sets["calibration_images"] == 40
    record = model.preprocessing.conformal
    assert record == sets["record"] and record["coverage"] == 0.9
    assert record["classes"] == ["a", "b"]
    # The scores are 1 - p(true class) of the validation images as the saved model serves them:
    # the temperature applied only when stored, each image one tile here.
    t = calibration["temperature"] if scaling else None
    served = apply_temperature(raw[PROB], t)
    truth = (raw["label"] == "b").to_numpy(int)
    for c, name in enumerate(["a", "b"]):
        expected = np.sort(1.0 - served[truth == c, c])
        assert np.allclose(np.sort(record["scores"][name]), expected, atol=1e-5)

    tiles = nodes.predict_split_tiles(model, store, split, evaluation)
    images = nodes.aggregate_image_predictions(tiles)
    metrics, flat, *_ = nodes.compute_test_metrics(images, tiles, evaluation, calibration)
    block = metrics["prediction_sets"]
    assert block["attached"] is True and block["n_images"] == 40
    # What the served model answers (add_prediction_sets) is what the report counted.
    answered = add_prediction_sets(images, record, ["a", "b"])
    members = answered["prediction_set"].str.split("|")
    covered = [label in row for label, row in zip(images["label"], members, strict=True)]
    assert block["coverage"] == pytest.approx(np.mean(covered))
    assert block["referred_share"] == pytest.approx(answered["refer"].mean())
    assert {"test_prediction_sets.coverage", "test_prediction_sets.coverage_per_class.a",
            "test_prediction_sets.mean_set_size", "test_prediction_sets.referred_share",
            "test_prediction_sets.coverage_target",
            "test_prediction_sets.calibration_images"} <= set(flat)
    assert "record" not in metrics["calibration"] and "prediction_sets" not in metrics[
        "calibration"]
    card = _card(metrics)
    assert "## When the model is unsure" in card
    assert "Prediction sets at coverage 0.9, calibrated on 40 validation images" in card
    assert f"coverage {block['coverage']:.3f}" in card


def test_too_small_validation_warns_and_saves_no_sets(setup, caplog):  # noqa: F811
    model, store, split = setup
    reason = "40 images, fewer than evaluation.conformal.min_images = 41"
    evaluation = params("evaluation", bootstrap_samples=20,
                        conformal={"coverage": 0.9, "min_images": 41})
    with caplog.at_level(logging.WARNING, logger="neuroblastoma_cnn"):
        model, calibration, _ = nodes.calibrate_model(model, store, split, evaluation)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and reason in warnings[0]
    assert "splitting.validation_fraction" in warnings[0]
    assert model.preprocessing.conformal is None
    assert calibration["temperature"] > 0  # the temperature is still fitted
    sets = calibration["prediction_sets"]
    assert sets["attached"] is False and reason in sets["reason"] and "record" not in sets

    tiles = nodes.predict_split_tiles(model, store, split, evaluation)
    images = nodes.aggregate_image_predictions(tiles)
    metrics, flat, *_ = nodes.compute_test_metrics(images, tiles, evaluation, calibration)
    assert metrics["prediction_sets"]["attached"] is False
    assert flat["test_prediction_sets.attached"]["value"] == 0.0  # the reason: not a metric
    assert "test_prediction_sets.coverage" not in flat
    card = _card(metrics)
    assert "No prediction sets attached: the validation split has " + reason in card
    # Nothing changes for the answers of a model without sets.
    assert add_prediction_sets(images, model.preprocessing.conformal, ["a", "b"]) is images


def test_test_report_on_a_hand_made_example():
    """Class a joins a set when p(a) >= 0.7, class b when p(b) >= 0.25: with coverage 0.5 and
    four calibration scores a class, c joins when at least 2 of its 4 scores are >= 1 - p(c)
    (p-value (k + 1) / 5 >= 0.5)."""
    record = {"coverage": 0.5, "classes": ["a", "b"],
              "scores": {"a": [0.1, 0.2, 0.3, 0.4], "b": [0.5, 0.6, 0.75, 0.8]}}
    rows = [  # label, p(a), p(b), set
        ("a", 0.9, 0.1),    # {a}: covered, accepted, right
        ("a", 0.72, 0.28),  # {a, b}: covered, referred
        ("a", 0.6, 0.4),    # {b}: missed, accepted, argmax a right
        ("b", 0.2, 0.8),    # {b}: covered, accepted, right
        ("b", 0.8, 0.2),    # {a}: missed, accepted, wrong
        ("b", 0.1, 0.9),    # {b}: covered, accepted, right
        ("b", 0.3, 0.7),    # {b}: covered, accepted, right
    ]
    tiles = pd.DataFrame({"image_path": [f"i{k}" for k in range(len(rows))],
                          "label": [r[0] for r in rows], "group": [f"g{k}" for k in range(7)],
                          "y_true": [int(r[0] == "b") for r in rows],
                          "prob_a": [r[1] for r in rows], "prob_b": [r[2] for r in rows]})
    images = nodes.aggregate_image_predictions(tiles)
    summary = {"coverage_target": 0.5, "calibration_images": 8, "attached": True,
               "record": record}
    block = nodes.prediction_set_metrics(images, summary)
    assert block["coverage"] == pytest.approx(5 / 7)
    assert block["coverage_per_class"] == pytest.approx({"a": 2 / 3, "b": 3 / 4})
    assert block["mean_set_size"] == pytest.approx(8 / 7)
    assert block["referred_share"] == pytest.approx(1 / 7)
    assert block["accepted_accuracy"] == pytest.approx(5 / 6)
    assert block["n_images"] == 7 and block["coverage_target"] == 0.5
    assert block["calibration_images"] == 8


def test_fit_uses_the_image_mean_of_tiles_and_the_patient_groups(caplog):
    """Two tiles an image: the score is 1 - the mean of its tiles' p(true class); groups come
    from the split table's column (two images of one patient are one group)."""
    rng = np.random.default_rng(1)
    n = 24
    p_a = rng.uniform(0.05, 0.95, 2 * n)
    tiles = pd.DataFrame({"image_path": np.repeat([f"i{k:02d}" for k in range(n)], 2),
                          "label": np.repeat(["a", "b"] * (n // 2), 2),
                          "group": np.repeat([f"g{k // 2}" for k in range(n)], 2),
                          "prob_a": p_a, "prob_b": 1 - p_a})
    record, summary = nodes.fit_prediction_sets(tiles, params("evaluation"))
    assert summary["attached"] and summary["calibration_images"] == n
    images = aggregate_image_probabilities(tiles)
    expected_a = np.sort(1 - images.loc[images["label"] == "a", "prob_a"])
    assert np.allclose(np.sort(record["scores"]["a"]), expected_a, atol=1e-6)
    # 12 patients are enough at min_images 20; the same 24 images as 1 patient are not.
    with caplog.at_level(logging.WARNING, logger="neuroblastoma_cnn"):
        none, alone = nodes.fit_prediction_sets(tiles.assign(group="p"), params("evaluation"))
    assert none is None and not alone["attached"]
    assert "1 patient group(s) for 2 classes" in alone["reason"]
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
