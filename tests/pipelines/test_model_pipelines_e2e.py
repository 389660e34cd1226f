"""End to end: raw BACH tissue -> trained, evaluated model logged to MLflow, for both ResNets.

Reads the session's trained project (`kedro run --env=tiny --pipeline=train_resnet34`, then
`--pipeline=resnet50`, the model half on the same data, as a user runs them) and checks the
catalog artifacts and, through MLflow's own client, what a user finds in the UI. That
`train_<model>` is the data pipelines plus the model half is checked on the registry below.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from _tiny_project import TrainedProject, latest

from neuroblastoma_cnn.datasets import TileStore, load_keras_model
from neuroblastoma_cnn.datasets.trained_models import TrainedModels
from neuroblastoma_cnn.pipeline_registry import MODELS, register_pipelines

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _finished_run(project: Path, run_name: str) -> mlflow.entities.Run:
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(
        experiment_names=["neuroblastoma_cnn_tiny"],
        filter_string=f"attributes.run_name = '{run_name}'",
        output_format="list",
    )
    assert len(runs) == 1, f"expected one MLflow run named {run_name}, got {len(runs)}"
    assert runs[0].info.status == "FINISHED"
    return runs[0]


def _check_calibration_card_registry(project: Path, model_name: str, model, metrics: dict,
                                     run: mlflow.entities.Run, pipeline: str) -> None:
    """Issue 21: calibration reported, the model card written, the model registered."""
    client = mlflow.MlflowClient()
    # Calibration: T fitted on the validation images, reported only (temperature_scaling off).
    assert metrics["calibration"]["temperature"] > 0 and not metrics["calibration"]["applied"]
    assert model.preprocessing.temperature is None
    for key in ("ece_before", "ece_after", "validation_ece_before", "temperature"):
        assert f"{model_name}.test_calibration.{key}" in run.data.metrics
    card = latest(project / f"data/08_reporting/{model_name}/model_card.md").read_text()
    assert card.startswith(f"# Model card: {model_name}")
    assert f"kedro run --pipeline={pipeline} --env=tiny" in card
    assert "Research use only, not for diagnosis" in card and "ECE before" in card
    # Prediction sets: attached when the validation images suffice (tiny's few do not: the
    # warning path), and the card and the metrics say which.
    sets = metrics["prediction_sets"]
    assert sets["attached"] is (model.preprocessing.conformal is not None)
    assert "## When the model is unsure" in card
    assert ("Prediction sets at coverage" if sets["attached"] else
            "No prediction sets attached") in card
    assert f"{model_name}.test_prediction_sets.attached" in run.data.metrics
    # The classical floor on the same split, beside the model (scored, or why not).
    floor = json.loads(latest(project / f"data/08_reporting/{model_name}/"
                               "floor_metrics.json").read_text())
    assert "## Classical floor" in card
    if "skipped" not in floor:
        assert 0.0 <= floor["f1_macro"] <= 1.0 and floor["n_images"] == metrics["n_test_images"]
        assert f"macro-F1 **{floor['f1_macro']:.3f}**" in card

    # Model Registry: the promoted model is a version of <experiment>-<architecture>, tagged
    # with the test metrics; champion (first version) unless the run flagged it untrained.
    name = f"neuroblastoma_cnn_tiny-{model_name}"
    registered = run.data.tags[f"{model_name}.registered_model"]
    assert registered == f"models:/{name}/1"
    version = client.get_model_version(name, "1")
    assert float(version.tags["test_f1_macro"]) == pytest.approx(metrics["f1_macro"], rel=1e-5)
    untrained = f"{model_name}.untrained" in run.data.tags
    assert version.tags["champion_at_registration"] == ("no" if untrained else "yes")
    # What is registered is the raw-image pyfunc (what `mlflow models serve` runs), logged
    # beside the Keras flavour; `predict -m models:/...` loads the .keras file inside it.
    served_uri = run.data.tags[f"{model_name}_raw_images.model_uri"]
    assert version.source == served_uri
    served = mlflow.models.get_model_info(served_uri)
    assert "keras" not in served.flavors and served.signature.inputs.input_names()[-1] == "image"
    loaded = TrainedModels("unused").load(registered)
    assert loaded.preprocessing.classes == model.preprocessing.classes


def test_train_pipeline_is_the_data_pipelines_and_the_model_half():
    pipelines = register_pipelines()
    data = set(pipelines["data_processing"].nodes)
    for model in MODELS:
        half = set(pipelines[model].nodes)
        assert data and half and not data & half
        assert set(pipelines[f"train_{model}"].nodes) == data | half, model


@pytest.mark.parametrize(("model_name", "pipeline"),
                         [("resnet34", "train_resnet34"), ("resnet50", "resnet50")])
def test_train_pipeline_logs_an_evaluated_model(trained: TrainedProject, model_name: str,
                                                pipeline: str):
    kedro_project = trained.path

    # Catalog: the model reloads with its preprocessing record and predicts test tiles.
    model = load_keras_model(latest(kedro_project / f"data/06_models/{model_name}/model.keras"))
    tiles = TileStore(latest(kedro_project / "data/03_primary/tiles"))
    assert list(model.preprocessing.classes) == tiles.metadata["classes"]
    assert model.preprocessing.input_size == 32
    assert model.preprocessing.architecture == model_name
    sample = tiles.get(tiles.index["tile_id"][:6]).astype("float32")
    catalog_prob = model.predict(sample, verbose=0)
    assert catalog_prob.shape == (6, 4)
    np.testing.assert_allclose(catalog_prob.sum(axis=1), 1.0, atol=1e-5)

    images = pd.read_csv(latest(kedro_project / f"data/07_model_output/{model_name}/"
                                 "image_predictions.csv"))
    split = pd.read_csv(latest(kedro_project / "data/05_model_input/split_table.csv"))
    assert set(images["image_path"]) == set(split.loc[split["split"] == "test", "image_path"])
    metrics = json.loads(latest(kedro_project / f"data/08_reporting/{model_name}/"
                                 "test_metrics.json").read_text())
    ci = metrics["macro_f1_ci"]
    assert 0.0 <= ci["low"] <= ci["high"] <= 1.0
    assert ci["point"] == pytest.approx(metrics["f1_macro"])

    # MLflow: one finished run named after the pipeline, with everything a user looks for.
    run = _finished_run(kedro_project, pipeline)
    params = run.data.params
    # the validated values, flattened (typed parameter groups are not logged as one repr)
    assert params[f"{model_name}.model.architecture"] == model_name
    assert params[f"{model_name}.training.epochs"] == "2"
    assert f"{model_name}.training.learning_rate" in params
    assert f"{model_name}.training" not in params and "ingestion" not in params
    if pipeline.startswith("train_"):  # the data pipelines ran in this run
        assert params["ingestion.input_size"] == "32"
    assert run.data.tags["git_commit"]
    if pipeline.startswith("train_"):  # the manifest is tagged by the run that ingested
        assert len(run.data.tags["manifest_sha256"]) == 64
    assert run.data.tags["tiles_version"] == tiles.path.parent.name
    assert run.data.metrics[f"{model_name}.test_f1_macro"] == pytest.approx(metrics["f1_macro"])
    client = mlflow.MlflowClient()
    history = client.get_metric_history(run.info.run_id, f"{model_name}.val_macro_f1")
    epochs = 2 if model_name == "resnet34" else 3  # resnet50: 2 head + 1 fine-tune epoch
    assert [h.step for h in history] == list(range(1, epochs + 1))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, model_name)}
    for name in ("confusion_matrix.png", "confusion_matrix.csv", "classification_report.csv",
                 "training_curves.png", "roc_curves.png", "test_metrics.json",
                 "misclassified_gallery.png", "training_input.png", "calibration.json",
                 "validation_reliability.png", "test_reliability.png", "model_card.md",
                 "model_card.html", "floor_metrics.json"):
        assert f"{model_name}/{name}" in artifacts, f"{name} missing from {sorted(artifacts)}"

    _check_calibration_card_registry(kedro_project, model_name, model, metrics, run, pipeline)

    data_artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "data")}
    if pipeline.startswith("train_"):  # the data pipelines' figures, with the run that made them
        assert {"data/split_summary.csv", "data/augmentation_grid.png"} <= data_artifacts

    # The logged model (Keras flavor) gives the catalog model's predictions through pyfunc.
    model_uri = run.data.tags[f"{model_name}.model_uri"]
    logged = mlflow.pyfunc.load_model(model_uri)
    np.testing.assert_allclose(np.asarray(logged.predict(sample)), catalog_prob, atol=1e-5)
    info = mlflow.models.get_model_info(model_uri)
    assert info.signature is not None
    assert info.metadata["preprocessing"]["classes"] == tiles.metadata["classes"]
