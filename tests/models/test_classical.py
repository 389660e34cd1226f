"""The classical floor: colour + texture features of image files, and the grouped RBF SVM.

Synthetic images only (no BACH): three classes that differ in colour and texture, a few groups
(patients) each, written as PNG and JPEG into a temporary folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from _synthetic_tissue import CLASSES, tissue
from PIL import Image
from sklearn.metrics import f1_score

from neuroblastoma_cnn.core.errors import DataError
from neuroblastoma_cnn.models.classical import (
    N_FEATURES,
    ColourTextureSVM,
    describe_images,
    glcm_features,
    grouped_folds,
    image_features,
    lbp_histogram,
    load_downscaled,
)


def _write(folder: Path, groups_per_class: int, per_group: int, seed: int
           ) -> tuple[list[Path], list[str], list[str]]:
    rng = np.random.default_rng(seed)
    paths, labels, groups = [], [], []
    for c, label in enumerate(CLASSES):
        for g in range(groups_per_class):
            group = f"s{seed}c{c}g{g}"
            for i in range(per_group):
                ext = ".png" if i % 2 else ".jpg"
                path = folder / f"{group}_{i}{ext}"
                Image.fromarray(tissue(label, rng)).save(path, quality=90)
                paths.append(path)
                labels.append(label)
                groups.append(group)
    return paths, labels, groups


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """Training images (4 groups a class) and held-out images of other groups, described."""
    out = {}
    for name, groups, seed in (("train", 4, 0), ("test", 2, 1)):
        folder = tmp_path_factory.mktemp(name)
        paths, labels, group_ids = _write(folder, groups, 3, seed)
        out[name] = (describe_images(paths, downscale=2), labels, group_ids, paths)
    return out


def _svm(seed: int = 0) -> ColourTextureSVM:
    return ColourTextureSVM(c_grid=[0.3, 3.0, 30.0], gamma_factors=[0.1, 1.0], inner_folds=3,
                            seed=seed)


# ----------------------------------------------------------------------------------- features


def test_image_features_have_a_fixed_length_and_are_finite():
    rng = np.random.default_rng(3)
    images = [
        np.full((40, 50, 3), 255, np.uint8),  # blank glass: no tissue pixel at all
        np.zeros((16, 16, 3), np.uint8),
        rng.integers(0, 256, (33, 61, 3), dtype=np.uint8),
        tissue(CLASSES[1], rng),
    ]
    for rgb in images:
        features = image_features(rgb)
        assert features.shape == (N_FEATURES,)
        assert features.dtype == np.float64
        assert np.isfinite(features).all()



def test_texture_features_see_texture_not_only_colour():
    flat = np.full((64, 64), 0.5)
    stripes = np.tile(np.array([0.2, 0.8] * 32), (64, 1))
    assert glcm_features(flat)[0] == 0.0 and glcm_features(stripes)[0] > 0.1
    assert lbp_histogram(flat)[8] == 1.0  # all neighbours >= centre: code 8

def test_describe_images_gives_one_row_per_path_in_order(data):
    features, _, _, paths = data["test"]
    assert features.shape == (len(paths), N_FEATURES)
    for i in (0, len(paths) - 1):
        np.testing.assert_array_equal(features[i], image_features(load_downscaled(paths[i], 2)))


def test_a_truncated_jpeg_is_a_data_error_naming_the_file(tmp_path):
    path = tmp_path / "Benign" / "cut.jpg"
    path.parent.mkdir()
    Image.fromarray(tissue(CLASSES[0], np.random.default_rng(0), 256)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(DataError, match="truncated or corrupt") as caught:
        describe_images([path], downscale=1)
    assert str(path) in str(caught.value)
    assert "\n" not in caught.value.one_line()
    with pytest.raises(DataError, match=r"^study fold 2: .*cut\.jpg"):
        describe_images([path], downscale=1, where="study fold 2")


def test_a_text_file_is_a_data_error_naming_the_file(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(tissue(CLASSES[2], np.random.default_rng(0))).save(good)
    text = tmp_path / "notes.jpg"
    text.write_text("not pixels\n")
    with pytest.raises(DataError, match="not a readable image") as caught:
        describe_images([good, text], downscale=1)
    assert str(text) in str(caught.value)


# -------------------------------------------------------------------------------------- folds


def test_inner_folds_never_put_one_group_on_both_sides():
    rng = np.random.default_rng(0)
    groups = np.repeat([f"p{i}" for i in range(15)], rng.integers(1, 6, 15))
    labels = np.array([("A", "B", "C")[int(g[1:]) % 3] for g in groups])
    folds = grouped_folds(labels, groups, n_splits=4, seed=7)
    assert folds is not None and len(folds) == 4
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested) == list(range(len(labels)))  # every row tested exactly once
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
        assert set(labels[train]) == {"A", "B", "C"}
    again = grouped_folds(labels, groups, n_splits=4, seed=7)
    assert all((a[1] == b[1]).all() for a, b in zip(folds, again, strict=True))


def test_inner_folds_shrink_to_the_smallest_class_and_warn(caplog):
    groups = ["a1", "a2", "a3", "a4", "a5", "b1", "b2"]
    labels = ["A"] * 5 + ["B"] * 2
    with caplog.at_level(logging.WARNING):
        folds = grouped_folds(labels, groups, n_splits=5)
    assert folds is not None and len(folds) == 2
    assert "only 2 group(s)" in caplog.text
    assert grouped_folds(["A", "A", "B"], ["a1", "a2", "b1"], n_splits=5) is None


# -------------------------------------------------------------------------------------- model


def test_svm_separates_classes_on_held_out_groups(data):
    x, y, groups, _ = data["train"]
    model = _svm().fit(x, y, groups)
    assert model.classes_ == sorted(CLASSES)
    x_test, y_test, test_groups, _ = data["test"]
    assert not set(groups) & set(test_groups)
    assert f1_score(y_test, model.predict(x_test), average="macro") == 1.0
    prob = model.predict_proba(x_test)
    assert prob.shape == (len(y_test), len(CLASSES))
    np.testing.assert_allclose(prob.sum(axis=1), 1.0)
    # Columns follow classes_: each image's own class has its highest probability.
    own = [model.classes_.index(label) for label in y_test]
    assert (prob.argmax(axis=1) == own).all()
    assert set(model.best_params_) == {"C", "gamma_factor", "gamma"}
    assert model.best_params_["gamma"] == pytest.approx(model.best_params_["gamma_factor"]
                                                        / N_FEATURES)


def test_svm_is_deterministic_for_a_seed(data):
    x, y, groups, _ = data["train"]
    x_test = data["test"][0]
    first, second = _svm(seed=5).fit(x, y, groups), _svm(seed=5).fit(x, y, groups)
    assert first.best_params_ == second.best_params_
    np.testing.assert_array_equal(first.predict_proba(x_test), second.predict_proba(x_test))


def test_svm_without_two_groups_a_class_uses_the_grid_middle(data, caplog):
    x, y, _, _ = data["train"]
    one_group_a_class = [f"only_{label}" for label in y]
    with caplog.at_level(logging.WARNING):
        model = _svm().fit(x, y, one_group_a_class)
    assert model.best_params_["C"] == 3.0 and model.best_params_["gamma_factor"] == 1.0
    assert "no grouped folds" in caplog.text
    np.testing.assert_allclose(model.predict_proba(x).sum(axis=1), 1.0)


def test_svm_refuses_a_single_class(data):
    x, _, groups, _ = data["train"]
    with pytest.raises(DataError, match="one class only"):
        _svm().fit(x, ["Normal"] * len(x), groups)


def test_probabilities_over_a_wider_class_list(data):
    """The floor's columns placed by name among more classes (one it never saw: zeros)."""
    features, labels, groups, _ = data["train"]
    svm = _svm().fit(features, labels, groups)
    test = data["test"][0]
    wider = ["never seen", *reversed(svm.classes_)]
    prob = svm.probabilities_over(test, wider)
    assert prob.shape == (len(test), len(wider)) and (prob[:, 0] == 0).all()
    np.testing.assert_allclose(prob[:, 1:], svm.predict_proba(test)[:, ::-1])
