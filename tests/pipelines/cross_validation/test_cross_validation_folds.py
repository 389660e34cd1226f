"""Cross-validation folds run through the study engine, in-process, with a small stand-in
network: every fold trained once, a run interrupted after two folds resumes with exactly the
missing one and ends with the same results as an uninterrupted run, and the fold models make
an ensemble whose outer-test probabilities are the members' mean."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _networks import small_cnn
from _params import params, store_metadata

from neuroblastoma_cnn.core.errors import ParameterError
from neuroblastoma_cnn.datasets import write_tile_store
from neuroblastoma_cnn.models.ensemble import ensemble_members, is_ensemble
from neuroblastoma_cnn.params import CrossValidationParams, base_group
from neuroblastoma_cnn.pipelines.cross_validation.nodes import (
    assign_cv_folds,
    build_cv_ensemble,
    run_cv_folds,
)
from neuroblastoma_cnn.pipelines.evaluation import nodes as evaluation
from neuroblastoma_cnn.pipelines.training import nodes as training
from neuroblastoma_cnn.trials.trial import ProjectSteps

CLASSES = ["alpha", "beta", "gamma"]
GROUPS_PER_CLASS = 4  # 1 outer test group + 3 folded ones
SIZE = 16


class CountingTrain:
    """The training node with the small network; counts its calls and can stop the run (as a
    kill would) when it is called for the ``stop_at``-th time."""

    def __init__(self, stop_at: int | None = None):
        self.calls = 0
        self.stop_at = stop_at

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.stop_at is not None and self.calls == self.stop_at:
            raise KeyboardInterrupt("stopped by the test")
        return training.train_model(*args, build=small_cnn, backup=False, **kwargs)


def steps(train) -> ProjectSteps:
    return ProjectSteps(train, evaluation.predict_split_tiles,
                        evaluation.aggregate_image_predictions, evaluation.compute_test_metrics)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    """Tiles of 3 classes x 4 patients x 2 images x 2 tiles, colour by class; one patient a
    class is the outer test part."""
    rng = np.random.default_rng(0)

    def records():
        for c, name in enumerate(CLASSES):
            for g in range(GROUPS_PER_CLASS):
                for i in range(2):
                    for _ in range(2):
                        tile = rng.normal(60 + 60 * c, 25, (SIZE, SIZE, 3)).clip(0, 255)
                        yield tile.astype(np.uint8), {"label": name, "group": f"{name}-{g}",
                                                      "image_path": f"{name}/{g}/{i}.png"}

    store = write_tile_store(tmp_path_factory.mktemp("tiles") / "tiles", records(),
                             store_metadata(CLASSES, SIZE), 64)
    split = store.index[["tile_id", "image_path", "label", "group"]].copy()
    split["split"] = np.where(split["group"].str.endswith("-0"), "test", "train")
    split["fold"] = -1
    return store, split


def cv_params(tmp: Path, **overrides) -> CrossValidationParams:
    raw = base_group("cross_validation", **{
        "n_folds": 3, "storage": f"sqlite:///{tmp / 'optuna.db'}", "log_fold_models": False,
        **overrides})
    return CrossValidationParams.parse(raw, "cross_validation")


def run(tmp: Path, data, train, storage: Path | None = None
        ) -> tuple[pd.DataFrame, pd.DataFrame]:
    store, split = data
    cv = cv_params(storage or tmp)
    folds = assign_cv_folds(split, cv)
    model = base_group("resnet34.model")
    fit = base_group("resnet34.training", epochs=2, batch_size=8, optimizer="sgd",
                     learning_rate=0.05, schedule=None, sampling="shuffle",
                     online_augmentation={**base_group("resnet34.training")[
                         "online_augmentation"], "enabled": False})
    return run_cv_folds("resnet34", model, fit, store, split, folds,
                        params("evaluation", bootstrap_samples=50), cv, steps(train),
                        models_dir=tmp / "models")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, data
                  ) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    """(folder, trials, predictions) of one cross-validation that ran through."""
    folder = tmp_path_factory.mktemp("cv_once")
    trials, predictions = run(folder, data, CountingTrain())
    return folder, trials, predictions


def test_interrupted_cross_validation_resumes_with_the_missing_fold_only(tmp_path: Path, data,
                                                                        uninterrupted):
    _, reference_trials, reference = uninterrupted

    stopped = CountingTrain(stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "twice", data, stopped)
    assert stopped.calls == 3  # two folds finished, the third stopped
    resumed = CountingTrain()
    trials, predictions = run(tmp_path / "twice", data, resumed)

    assert resumed.calls == 1  # only the fold that did not finish
    assert sorted(trials["fold"]) == [0, 1, 2]
    held = predictions[predictions["set"] == "held_out"]
    folded = data[1].loc[data[1]["split"] != "test", "image_path"]
    assert sorted(held["image_path"]) == sorted(folded.unique())  # each image once, out of fold
    assert (predictions["set"] == "outer").sum() == 3 * len(CLASSES) * 2  # 3 folds x outer images
    key = ["fold", "set", "image_path"]
    pd.testing.assert_frame_equal(predictions.sort_values(key, ignore_index=True),
                                  reference.sort_values(key, ignore_index=True))
    np.testing.assert_allclose(trials["f1_macro"], reference_trials["f1_macro"])

    # Run again: everything is done, nothing trains.
    again = CountingTrain()
    run(tmp_path / "twice", data, again)
    assert again.calls == 0

    # Killed after a fold's folder was complete but before its trial was recorded: the
    # folder's result is taken, the fold is not trained again (here: no trial recorded at all).
    lost = CountingTrain()
    trials, predictions = run(tmp_path / "twice", data, lost, storage=tmp_path / "lost")
    assert lost.calls == 0 and sorted(trials["fold"]) == [0, 1, 2]
    pd.testing.assert_frame_equal(predictions.sort_values(key, ignore_index=True),
                                  reference.sort_values(key, ignore_index=True))


def test_fold_ensemble_is_the_mean_of_the_fold_models(data, uninterrupted):
    folder, trials, predictions = uninterrupted
    ensemble = build_cv_ensemble(trials, cv_params(folder))
    assert is_ensemble(ensemble) and len(ensemble_members(ensemble)) == 3
    store, split = data
    outer = split[split["split"] == "test"]
    tiles = np.stack(list(store.get(outer["tile_id"].tolist()))).astype("float32")
    members = np.mean([m.predict_on_batch(tiles) for m in ensemble_members(ensemble)], axis=0)
    np.testing.assert_allclose(ensemble.predict_on_batch(tiles), members, atol=1e-6)
    # The fold's saved outer predictions are those of its model.
    first = predictions[(predictions["set"] == "outer") & (predictions["fold"] == 0)]
    assert len(first) == outer["image_path"].nunique()


def test_more_folds_than_patients_of_a_class_stops_before_training(tmp_path: Path, data):
    _, split = data
    with pytest.raises(ParameterError, match=r"cross_validation.n_folds = 4.*'alpha' has 3"):
        assign_cv_folds(split, cv_params(tmp_path, n_folds=4))



def test_stain_normalisation_per_fold_is_refused_before_training(tmp_path: Path, data):
    store, split = data
    cv = cv_params(tmp_path)
    train = CountingTrain()
    fit = base_group("resnet34.training", stain_normalisation="macenko")
    with pytest.raises(ParameterError, match=r"stain_normalisation = macenko.*one ensemble"):
        run_cv_folds("resnet34", base_group("resnet34.model"), fit, store, split,
                     assign_cv_folds(split, cv), params("evaluation"), cv, steps(train),
                     models_dir=tmp_path / "models")
    assert train.calls == 0
