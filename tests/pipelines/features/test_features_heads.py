"""scikit-learn heads on CNN features: grouped folds, saved heads, clear errors, same metrics.

Synthetic feature tables (no TensorFlow): each class has its own mean, each patient group an
offset of its own, so a fold that split a group would be easier than a grouped one.
"""

from __future__ import annotations

import copy
from typing import Any

import mlflow
import mlflow.sklearn
import numpy as np
import pandas as pd
import pytest
from kedro.io.core import Version

from neuroblastoma_cnn.core.errors import DataError, ModelError, ParameterError
from neuroblastoma_cnn.datasets.sklearn_heads import SklearnHeadsDataset
from neuroblastoma_cnn.params import EvaluationParams, base_group
from neuroblastoma_cnn.pipelines.evaluation.nodes import (
    aggregate_image_predictions,
    compute_test_metrics,
)
from neuroblastoma_cnn.pipelines.features import heads as h
from neuroblastoma_cnn.pipelines.features import nodes as n

CLASSES = ["Benign", "InSitu", "Invasive"]


def params(**changes: Any) -> dict[str, Any]:
    """The project's own `features.heads` parameters, with small grids for speed."""
    p = copy.deepcopy(base_group("features.heads"))
    p["classifiers"]["svm"]["grid"] = {"C": [0.1, 1.0], "gamma": ["scale"]}
    p["classifiers"]["tree"]["grid"] = {"max_depth": [2, 4], "min_samples_leaf": [1]}
    p["classifiers"]["logreg"]["grid"] = {"C": [0.1]}
    p["classifiers"]["hgb"]["grid"] = {"learning_rate": [0.1], "max_depth": [3]}
    p["classifiers"]["hgb"]["params"]["max_iter"] = 20
    for key, value in changes.items():
        p[key] = value
    return p


def feature_table(
    groups_per_class: int = 6, tiles_per_image: int = 4, dim: int = 16, seed: int = 0,
    n_folds: int = 3,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(feature table, split table): 2 images per group; per class the last group is test, the
    one before validation, the rest train; folds round-robin over non-test groups."""
    rng = np.random.default_rng(seed)
    rows, features = [], []
    tile_id = 0
    fold_counter = 0
    for cls in CLASSES:
        mean = rng.normal(0, 1.5, dim)
        for g in range(groups_per_class):
            group = f"{cls[:3]}{g:02d}"
            split = ("test" if g == groups_per_class - 1 else
                     "validation" if g == groups_per_class - 2 else "train")
            fold = -1 if split == "test" else fold_counter % n_folds
            fold_counter += split != "test"
            offset = rng.normal(0, 1.0, dim)
            for image in range(2):
                for _ in range(tiles_per_image):
                    rows.append({"tile_id": tile_id, "image_path": f"{cls}/{group}/{image}.png",
                                 "label": cls, "group": group, "split": split, "fold": fold})
                    features.append(mean + offset + rng.normal(0, 1.0, dim))
                    tile_id += 1
    table = pd.DataFrame(rows)
    split_table = table.copy()
    x = np.asarray(features, dtype=np.float32)
    for i in range(dim):
        table[f"f{i}"] = x[:, i]
    softmax = rng.dirichlet(np.ones(len(CLASSES)), len(table))
    for i, cls in enumerate(CLASSES):
        table[f"cnn_prob_{cls}"] = softmax[:, i]
    table.attrs[n.ATTRS] = {"extractor": identity(dim)}
    return table, split_table


def identity(dim: int, weights: str = "a" * 64) -> dict[str, Any]:
    return {"architecture": "resnet34", "source": "data/06_models/resnet34/model.keras/v1",
            "weights_sha256": weights, "record_sha256": "b" * 64, "classes": CLASSES,
            "feature_dim": dim, "tiles_version": "v0"}


# ------------------------------------------------------------------------------------ folds


@pytest.mark.parametrize("strategy", ["split_folds", "stratified_group_kfold"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cv_folds_never_split_a_group(strategy: str, seed: int):
    rng = np.random.default_rng(seed)
    n_rows = 300
    groups = rng.integers(0, 17, n_rows).astype(str)  # uneven groups, interleaved rows
    labels = rng.integers(0, 3, n_rows)
    group_fold = {g: i % 4 for i, g in enumerate(np.unique(groups))}
    folds = np.array([group_fold[g] for g in groups])
    cv = h.CvParams(strategy=strategy, n_splits=4, shuffle=True, seed=seed)
    splits = h.group_folds(labels, groups, folds, cv)
    assert len(splits) == 4
    tested = np.concatenate([test for _, test in splits])
    assert sorted(tested) == list(range(n_rows))  # a partition: every row tested exactly once
    for train, test in splits:
        assert not set(groups[train]) & set(groups[test])
        assert len(set(train) | set(test)) == n_rows


def test_grid_search_and_calibration_use_the_grouped_folds(monkeypatch: pytest.MonkeyPatch):
    table, split_table = feature_table()
    seen: list[Any] = []
    original_grid, original_cal = h.GridSearchCV, h.CalibratedClassifierCV

    def grid(*args: Any, **kwargs: Any) -> Any:
        seen.append(("grid", kwargs["cv"]))
        return original_grid(*args, **kwargs)

    def calibrated(*args: Any, **kwargs: Any) -> Any:
        seen.append(("calibration", kwargs["cv"]))
        return original_cal(*args, **kwargs)

    monkeypatch.setattr(h, "GridSearchCV", grid)
    monkeypatch.setattr(h, "CalibratedClassifierCV", calibrated)
    p = params()
    p["classifiers"] = {"svm": p["classifiers"]["svm"]}
    n.fit_heads(table, split_table, p)
    assert [kind for kind, _ in seen] == ["grid", "calibration"]
    fit_rows = table[table["split"] == "train"].reset_index(drop=True)
    for _, folds in seen:
        assert len(folds) == 3
        for train, test in folds:
            assert not set(fit_rows["group"][train]) & set(fit_rows["group"][test])


def test_test_tiles_may_not_fit_the_heads():
    table, split_table = feature_table()
    with pytest.raises(DataError, match="fold -1"):
        n.fit_heads(table, split_table, params(fit_splits=["train", "test"]))


def test_a_fold_without_a_class_to_fit_on_is_a_clear_error():
    table, split_table = feature_table(groups_per_class=3)  # one training group per class
    with pytest.raises(DataError, match=r"leaves no patient of class\(es\) \['\w+'") as caught:
        n.fit_heads(table, split_table, params())
    assert "fit_splits: [train, validation]" in caught.value.one_line()
    bundles, _ = n.fit_heads(table, split_table, params(fit_splits=["train", "validation"]))
    assert set(bundles) == {"svm", "tree", "logreg", "hgb"}


def test_too_few_groups_for_the_folds_is_a_clear_error():
    table, split_table = feature_table(groups_per_class=3)
    cv = {"strategy": "stratified_group_kfold", "n_splits": 5, "shuffle": True, "seed": 0}
    with pytest.raises(DataError, match=r"Only 3 patient group\(s\).*n_splits is 5"):
        n.fit_heads(table, split_table, params(cv=cv))


# ------------------------------------------------------------------------------- the heads


def test_saved_head_reloads_and_predicts_the_same_probabilities(tmp_path):
    table, split_table = feature_table()
    bundles, cv_results = n.fit_heads(table, split_table, params())
    assert set(bundles) == {"svm", "tree", "logreg", "hgb"}
    assert set(cv_results["head"]) == set(bundles)
    dataset = SklearnHeadsDataset(str(tmp_path / "heads.pkl"), version=Version(None, None))
    dataset.save(bundles)
    saved = list((tmp_path / "heads.pkl").iterdir())
    assert len(saved) == 1  # one version folder
    loaded = SklearnHeadsDataset(str(tmp_path / "heads.pkl"), version=Version(None, None)).load()
    x = table[n.feature_columns(table)].to_numpy(dtype=np.float32)
    for name, bundle in bundles.items():
        assert loaded[name]["extractor"] == bundle["extractor"]
        np.testing.assert_array_equal(loaded[name]["model"].predict_proba(x),
                                      bundle["model"].predict_proba(x))
        prob = bundle["model"].predict_proba(x)
        np.testing.assert_allclose(prob.sum(axis=1), 1.0, atol=1e-6)
    # A second save is a new version, never a replacement.
    SklearnHeadsDataset(str(tmp_path / "heads.pkl"), version=Version(None, "later")).save(bundles)
    assert len(list((tmp_path / "heads.pkl").iterdir())) == 2


def test_svm_is_calibrated_and_the_tree_keeps_its_leaf_frequencies():
    table, split_table = feature_table()
    bundles, _ = n.fit_heads(table, split_table, params())
    assert type(bundles["svm"]["model"]).__name__ == "CalibratedClassifierCV"
    assert bundles["svm"]["calibration"] == "sigmoid"
    assert type(bundles["tree"]["model"]).__name__ == "Pipeline"
    assert [s for s, _ in bundles["tree"]["model"].steps] == ["scale", "clf"]


def test_svc_with_its_own_tile_level_probabilities_is_refused():
    table, split_table = feature_table()
    p = params()
    p["classifiers"]["svm"]["params"]["probability"] = True
    with pytest.raises(ParameterError, match="mixes patients"):
        n.fit_heads(table, split_table, p)
    p = params()
    p["classifiers"]["svm"]["calibration"] = None
    with pytest.raises(ParameterError, match="no probabilities of its own") as caught:
        n.fit_heads(table, split_table, p)
    assert "calibration: sigmoid" in caught.value.one_line()


def test_unknown_parameters_are_refused():
    table, split_table = feature_table()
    with pytest.raises(ParameterError):
        n.fit_heads(table, split_table, params(typo=1))
    p = params()
    p["classifiers"]["tree"]["grid"] = {"depth": [3]}
    with pytest.raises(ParameterError, match="tree"):
        n.fit_heads(table, split_table, p)


def test_class_missing_from_the_training_split_names_what_to_run():
    table, split_table = feature_table()
    keep = ~((table["label"] == "InSitu") & (table["split"] == "train"))
    table, split_table = table[keep], split_table[keep]
    with pytest.raises(DataError) as caught:
        n.fit_heads(table, split_table, params())
    text = caught.value.one_line()
    assert "InSitu" in text
    assert "kedro run --pipeline=splitting" in text
    assert "kedro run --pipeline=resnet34_features" in text


def test_feature_table_from_other_tiles_is_refused():
    table, split_table = feature_table()
    other = split_table.copy()
    other.loc[0, "image_path"] = "elsewhere.png"
    with pytest.raises(DataError, match="another tiles version"):
        n.fit_heads(table, other, params())
    bare = table.copy()
    bare.attrs = {}
    with pytest.raises(DataError, match="which model extracted"):
        n.fit_heads(bare, split_table, params())


def test_head_of_another_extractor_is_refused():
    table, split_table = feature_table()
    p = params()
    p["classifiers"] = {"logreg": p["classifiers"]["logreg"]}
    bundles, _ = n.fit_heads(table, split_table, p)
    retrained = table.copy()
    retrained.attrs = {n.ATTRS: {"extractor": identity(16, weights="c" * 64)}}
    with pytest.raises(ModelError, match=r"Head 'logreg'.*weights 'a{12}' vs 'c{12}'"):
        n.predict_tile_probabilities(retrained, bundles, "test")


# ------------------------------------------------------------------------------ evaluation


def test_heads_are_evaluated_exactly_like_the_cnn():
    table, split_table = feature_table()
    bundles, _ = n.fit_heads(table, split_table, params())
    tiles = n.predict_tile_probabilities(table, bundles, "test")
    assert list(dict.fromkeys(tiles["predictor"])) == ["cnn_softmax", "svm", "tree", "logreg",
                                                       "hgb"]
    evaluation = EvaluationParams.parse(base_group("evaluation", bootstrap_samples=200, seed=3),
                                        "evaluation")
    images, metrics, flat, reports, confusion = n.evaluate_predictors(tiles, evaluation)
    for name in ("cnn_softmax", "svm"):
        one = tiles[tiles["predictor"] == name].drop(columns="predictor").reset_index(drop=True)
        expected_images = aggregate_image_predictions(one)
        ours = images[images["predictor"] == name].drop(columns="predictor")
        pd.testing.assert_frame_equal(ours.reset_index(drop=True), expected_images)
        expected, _, report, counts, _ = compute_test_metrics(expected_images, one, evaluation)
        assert metrics[name] == expected
        ours_report = reports[reports["predictor"] == name].drop(columns="predictor")
        pd.testing.assert_frame_equal(ours_report.reset_index(drop=True), report)
        ours_counts = confusion[(confusion["predictor"] == name) & ~confusion["normalized"]]
        pd.testing.assert_frame_equal(
            ours_counts.drop(columns=["predictor", "normalized"]).reset_index(drop=True), counts,
            check_dtype=False)
        assert flat[f"{name}.test_f1_macro"]["value"] == expected["f1_macro"]
    comparison = n.comparison_table(metrics, bundles)
    assert list(comparison["predictor"]) == ["cnn_softmax", "svm", "tree", "logreg", "hgb"]
    row = comparison.set_index("predictor").loc["svm"]
    assert row["f1_macro_low"] <= row["f1_macro"] <= row["f1_macro_high"]
    assert row["cv_score"] == bundles["svm"]["cv"]["mean"]
    confusion_fig, roc_fig = n.plot_predictors(images, confusion)
    assert len(confusion_fig.axes) >= 5
    assert len(roc_fig.axes) == 5


def test_heads_beat_chance_on_separable_features():
    """Not a test that cannot fail: random heads would score about 1/3 here."""
    table, split_table = feature_table(groups_per_class=8, seed=4)
    bundles, _ = n.fit_heads(table, split_table, params())
    tiles = n.predict_tile_probabilities(table, bundles, "test")
    _, metrics, *_ = n.evaluate_predictors(tiles, base_group("evaluation", bootstrap_samples=50))
    assert metrics["logreg"]["f1_macro"] > 0.6
    assert metrics["svm"]["f1_macro"] > 0.6


def test_heads_are_logged_as_mlflow_child_runs(tmp_path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("features_heads_test")  # not whatever an earlier test left active
    table, split_table = feature_table()
    p = params()
    p["classifiers"] = {k: p["classifiers"][k] for k in ("svm", "tree")}
    bundles, _ = n.fit_heads(table, split_table, p)
    dataset = SklearnHeadsDataset(str(tmp_path / "heads.pkl"), log_to_mlflow=True,
                                  version=Version(None, None))
    try:
        with mlflow.start_run() as parent:
            mlflow.set_tag("resnet34.model_uri", "models:/m-123")
            dataset.save(bundles)
        children = mlflow.search_runs(
            filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
            output_format="list")
        assert sorted(r.info.run_name for r in children) == ["resnet34.svm", "resnet34.tree"]
        x = table[n.feature_columns(table)].to_numpy(dtype=np.float32)
        for run in children:
            name = run.data.tags["head"]
            assert run.data.tags["extractor_model"] == "models:/m-123"
            assert run.data.tags["extractor_weights_sha256"] == "a" * 64
            assert "cv_score_mean" in run.data.metrics
            for key, value in bundles[name]["best_params"].items():
                assert run.data.params[f"best.{key}"] == str(value)
            models = mlflow.search_logged_models(filter_string=f"source_run_id = "
                                                 f"'{run.info.run_id}'", output_format="list")
            assert len(models) == 1
            info = mlflow.models.get_model_info(models[0].model_uri)
            assert info.signature is not None
            reloaded = mlflow.sklearn.load_model(models[0].model_uri)
            np.testing.assert_array_equal(reloaded.predict_proba(x),
                                          bundles[name]["model"].predict_proba(x))
    finally:
        mlflow.set_tracking_uri(None)
