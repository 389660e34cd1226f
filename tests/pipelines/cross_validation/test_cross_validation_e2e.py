"""`kedro run --pipeline=cross_validate` end to end on real tissue (tiny sizes): 3 patient folds
and an outer test part, the classical floor on the same folds, one MLflow parent run with a
child run per fold, the versioned report and the fold ensemble used by the predict pipeline
(resuming without training a fold twice: test_cross_validation_folds.py); a selection whose
winner is the CNN registers its fold ensemble as the champion without training a fold again."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from _tiny_project import latest, make_project
from conftest import make_bach_subset
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from neuroblastoma_cnn.datasets import load_keras_model
from neuroblastoma_cnn.models.ensemble import ensemble_members, is_ensemble

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "resnet34"


def _run(project: Path, pipeline: str, params: dict | None = None) -> None:
    bootstrap_project(project)
    with KedroSession.create(project_path=project, env="tiny", runtime_params=params) as session:
        session.run(pipeline_names=[pipeline])
    assert mlflow.active_run() is None


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project whose raw data is 4 classes x 4 patients x 1 image: one patient a class is
    the outer test part, three are folded."""
    folder = tmp_path_factory.mktemp("cv")
    images = make_bach_subset(folder / "images", images_per_patient=1, patients_per_class=4)
    root = make_project(folder / "project", images=images, tracking_in_conf=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        _run(root, "cross_validate")
        yield root


def test_every_image_is_scored_once_out_of_fold_with_the_floor_beside(project: Path):
    data = project / "data"
    folds = pd.read_csv(latest(data / "05_model_input/cv_folds.csv"))
    assert sorted(folds.loc[folds["role"] == "cv", "fold"].unique()) == [0, 1, 2]
    assert (folds["role"] == "outer").sum() == 4  # one patient (image) per class
    assert folds.groupby("group")["fold"].nunique().max() == 1

    predictions = pd.read_csv(latest(data / f"07_model_output/{MODEL}/cv_predictions.csv"))
    held = predictions[predictions["set"] == "held_out"]
    assert sorted(held["image_path"]) == sorted(folds.loc[folds["role"] == "cv", "image_path"])
    floor = pd.read_csv(latest(data / "05_model_input/cv_floor_predictions.csv"))
    assert sorted(floor.loc[floor["set"] == "held_out", "image_path"]) == sorted(
        held["image_path"])

    summary = pd.read_csv(latest(data / f"08_reporting/{MODEL}/cv_summary.csv"))
    assert list(summary["model"]) == [MODEL, "floor", f"{MODEL}+floor"]
    assert summary[["wins", "losses"]].iloc[0].sum() <= 3
    assert summary["outer_ensemble_f1"].between(0, 1).all()
    report = latest(data / f"08_reporting/{MODEL}/cv_report.md").read_text()
    assert "Pooled out-of-fold" in report and "| floor |" in report
    # The run's model card: the fold ensemble's, with the summary beside the floor.
    card = latest(data / f"08_reporting/{MODEL}/cv_model_card.md").read_text()
    assert card.startswith(f"# Model card: {MODEL} fold ensemble")
    assert "## Cross-validation" in card and "| floor |" in card and "not for diagnosis" in card
    assert "| class | fold 0 | fold 1 | fold 2 | outer |" in card  # counts per fold
    assert f"{summary['pooled_f1'].iloc[0]:.3f}" in card


def test_one_parent_run_with_a_child_run_per_fold(project: Path):
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    parent = mlflow.search_runs(experiment_names=["neuroblastoma_cnn_tiny"], output_format="list",
                                filter_string="attributes.run_name = 'cross_validate'")[0]
    children = mlflow.search_runs(
        experiment_names=["neuroblastoma_cnn_tiny"], output_format="list",
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(int(c.data.tags["study.repeat"]) for c in children) == [0, 1, 2]
    assert all("test_f1_macro" in c.data.metrics for c in children)
    assert f"{MODEL}.cv.{MODEL}.pooled_f1" in parent.data.metrics
    assert f"{MODEL}.cv.{MODEL}_plus_floor.pooled_f1" in parent.data.metrics
    assert f"{MODEL}_cv_ensemble.model_uri" in parent.data.tags
    # The fold ensemble is also logged as a raw-image pyfunc (what `mlflow models serve` runs).
    served = mlflow.models.get_model_info(
        parent.data.tags[f"{MODEL}_cv_ensemble_raw_images.model_uri"])
    assert served.signature.inputs.input_names() == ["file", "image"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(
        parent.info.run_id, f"{MODEL}/cross_validation")}
    assert f"{MODEL}/cross_validation/cv_summary.csv" in artifacts
    assert f"{MODEL}/cross_validation/cv_model_card.html" in artifacts


def test_the_fold_ensemble_predicts_like_a_single_model(project: Path):
    path = latest(project / f"data/06_models/{MODEL}/cv_ensemble.keras")
    ensemble = load_keras_model(path)
    assert is_ensemble(ensemble) and len(ensemble_members(ensemble)) == 3
    predict = project / "data" / "01_raw" / "predict"
    predict.mkdir(parents=True)
    for image in sorted((project / "data/01_raw/images").glob("*/*/*.png"))[:2]:
        shutil.copy(image, predict / image.name)
    _run(project, "predict", {"predict": {"model": str(path), "gradcam": True}})
    table = pd.read_csv(latest(project / "data/07_model_output/predictions.csv"))
    assert len(table) == 2 and table["predicted"].notna().all()
    assert len(list(latest(project / "data/08_reporting/gradcam").glob("*.png"))) == 2



def test_a_selection_whose_winner_is_the_cnn_serves_its_fold_ensemble(project: Path):
    # Only the CNN is a candidate, so it wins; its folds, finished above, are not trained again.
    folds = sorted((project / f"data/06_models/{MODEL}").rglob("*.keras"))
    _run(project, "select_model", {"select_model": {"candidates": [MODEL]}})
    assert sorted(p for p in (project / f"data/06_models/{MODEL}").rglob("*.keras")
                  if "cv_ensemble" not in p.as_posix()) == \
        [p for p in folds if "cv_ensemble" not in p.as_posix()]
    champion = latest(project / "data/06_models/champion/model").with_name("model.keras")
    model = load_keras_model(champion)
    assert is_ensemble(model) and model.preprocessing.conformal["coverage"] == 0.9
    scores = pd.read_json(latest(project / "data/08_reporting/champion_scores.json"),
                          typ="series")
    assert scores["model"] == MODEL and scores["outer_images"] == 4
    uri = latest(project / "data/08_reporting/champion_uri.txt").read_text()
    version = mlflow.MlflowClient().get_model_version_by_alias(
        uri.removeprefix("models:/").split("@")[0], "champion")
    assert version.tags["family"] == MODEL
