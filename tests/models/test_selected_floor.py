"""The selected floor: scale, feature groups and head chosen on grouped inner folds, on
synthetic tissue (no BACH), and its parameters' one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _synthetic_tissue import CLASSES, tissue
from PIL import Image
from sklearn.metrics import f1_score

from neuroblastoma_cnn.core.errors import ParameterError
from neuroblastoma_cnn.models.classical import (
    CORE_GROUPS,
    FEATURE_GROUPS,
    N_ALL_FEATURES,
    N_FEATURES,
    all_features,
    group_columns,
    image_features,
)
from neuroblastoma_cnn.models.selected_floor import SelectedFloor, describe_bank
from neuroblastoma_cnn.params import ConformalParams, SelectedFloorParams, base_group

SPACE = {"scales": [1, 2], "feature_sets": [list(CORE_GROUPS), ["rgb", "gradient"]],
         "heads": {"logistic": {"C": [0.1, 1.0]}, "svm": {"C": [10.0], "gamma_factor": [0.3]},
                   "boosting": {"learning_rate": [0.1], "max_iter": [20]}},
         "inner_folds": 3}


def _images(folder: Path, groups_per_class: int, seed: int) -> tuple[list[Path], list, list]:
    rng = np.random.default_rng(seed)
    paths, labels, groups = [], [], []
    for c, label in enumerate(CLASSES):
        for g in range(groups_per_class):
            for i in range(3):
                path = folder / f"s{seed}c{c}g{g}_{i}.png"
                Image.fromarray(tissue(label, rng)).save(path)
                paths += [path]
                labels += [label]
                groups += [f"s{seed}c{c}g{g}"]
    return paths, labels, groups


def test_the_original_features_are_the_core_groups_of_every_feature() -> None:
    rgb = (np.random.default_rng(0).random((48, 56, 3)) * 255).astype(np.uint8)
    every = all_features(rgb)
    assert every.shape == (N_ALL_FEATURES,) == (sum(FEATURE_GROUPS.values()),)
    np.testing.assert_array_equal(every[group_columns(CORE_GROUPS)], image_features(rgb))
    assert len(group_columns(CORE_GROUPS)) == N_FEATURES


def test_the_search_chooses_on_inner_folds_and_predicts_new_patients(tmp_path: Path) -> None:
    paths, labels, groups = _images(tmp_path, 4, 0)
    test_paths, test_labels, _ = _images(tmp_path, 2, 1)
    floor = SelectedFloor(**SPACE, seed=0).fit_images(paths, labels, groups)
    assert len(floor.scores_) == len(floor.candidates()) == 2 * 2 * 4
    assert floor.chosen_ in floor.candidates() and 0.0 <= floor.cv_score_ <= 1.0
    prob = floor.predict_proba_images(test_paths)
    assert prob.shape == (len(test_paths), len(CLASSES))
    np.testing.assert_allclose(prob.sum(axis=1), 1.0)
    predicted = np.asarray(floor.classes_)[prob.argmax(axis=1)]
    assert f1_score(test_labels, predicted, average="macro") >= 0.6
    bank = describe_bank(test_paths, [floor.chosen_.scale])
    wide = floor.probabilities_over(bank, [*floor.classes_, "Unseen"])
    assert wide[:, -1].tolist() == [0.0] * len(test_paths)


@pytest.mark.parametrize(("change", "message"), [
    ({"scales": [0]}, r"scales = \[0\]"),
    ({"feature_sets": [["colour", "hue"]]}, r"Unknown feature group\(s\) \['hue'\]"),
    ({"heads": {"forest": {"n": [1]}}}, r"heads \['forest'\]: choose among"),
    ({"heads": {"svm": {"C": [1.0]}}}, r"heads\.svm needs non-empty lists for C, gamma_factor"),
    ({"inner_folds": 1}, r"inner_folds = 1"),
])
def test_a_bad_search_space_is_one_line(change: dict, message: str) -> None:
    with pytest.raises(ParameterError, match=message) as info:
        SelectedFloor(**{**SPACE, **change})
    assert "\n" not in str(info.value)


def test_the_yaml_defaults_are_typed() -> None:
    floor = SelectedFloorParams.parse(base_group("select_model.floor"), "select_model.floor")
    SelectedFloor(floor.scales, floor.feature_sets, floor.heads, floor.inner_folds,
                  floor.calibration)
    conformal = ConformalParams.parse(base_group("select_model.conformal"),
                                      "select_model.conformal")
    assert conformal.coverage == 0.9
    with pytest.raises(ParameterError, match=r"select_model\.conformal\.coverage"):
        ConformalParams.parse({"coverage": 1.2, "min_images": 20}, "select_model.conformal")


def test_the_temperature_keeps_the_svm_decision() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(72, N_ALL_FEATURES))
    y = np.asarray(CLASSES * 24)
    for i, c in enumerate(CLASSES):
        x[y == c, i] += 1.5
    floor = SelectedFloor([8], [list(CORE_GROUPS)], {"svm": {"C": [1.0], "gamma_factor": [0.3]}},
                          3, "temperature").fit({8: x}, y, np.arange(72) // 3)
    assert floor.temperature_ > 0
    prob = floor.predict_proba({8: x})
    np.testing.assert_allclose(prob.sum(axis=1), 1.0)
    svm = floor.model_.predict(x[:, group_columns(CORE_GROUPS)])
    assert (prob.argmax(axis=1) == svm).mean() >= 0.97  # ties aside, the SVM's own answer
