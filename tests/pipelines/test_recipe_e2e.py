"""End to end with the small-data recipe switched on: balanced sampling, online augmentation,
stain normalisation, per-image validation, TTA; the model carries its stain reference, the
run logs the grid of what the network saw and the TTA figures beside the plain ones."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from _tiny_project import latest

from neuroblastoma_cnn.datasets import load_keras_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECIPE = {
    "augmentation": {"target_per_class": 0},
    "resnet34": {"training": {
        "optimizer": "adamw", "learning_rate": 0.001, "weight_decay": 0.05,
        "schedule": {"type": "warmup_cosine", "warmup_epochs": 1}, "label_smoothing": 0.1,
        "sampling": "balanced", "steps_per_epoch": 3, "online_augmentation": {"enabled": True},
        "stain_normalisation": "macenko", "monitor": "val_image_macro_f1",
        "monitor_window": 2,
    }},
    "evaluation": {"tta": True},
}


def test_recipe_run_records_stain_reference_tta_and_input_grid(kedro_project: Path, run_kedro):
    run_kedro("train_resnet34", runtime_params=RECIPE)

    model = load_keras_model(latest(kedro_project / "data/06_models/resnet34/model.keras"))
    reference = model.preprocessing.stain_reference
    assert reference["method"] == "macenko"
    assert np.asarray(reference["stain_matrix"]).shape == (2, 3)

    history = pd.read_csv(latest(kedro_project / "data/06_models/resnet34/"
                                  "training_history.csv"))
    assert history["val_image_macro_f1"].notna().all()
    assert history["monitor_smoothed"].notna().all()
    metrics = json.loads(latest(kedro_project / "data/08_reporting/resnet34/"
                                 "test_metrics.json").read_text())
    assert 0 <= metrics["tta"]["f1_macro"] <= 1
    images = pd.read_csv(latest(kedro_project / "data/07_model_output/resnet34/"
                                 "image_predictions.csv"))
    assert {"tta_predicted", "predicted"} <= set(images.columns)
    assert (kedro_project / "data/08_reporting/resnet34/training_input.png").is_dir()

    mlflow.set_tracking_uri(f"sqlite:///{kedro_project / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["neuroblastoma_cnn_tiny"], output_format="list",
                             filter_string="attributes.run_name = 'train_resnet34'")[0]
    assert run.data.params["resnet34.training.sampling"] == "balanced"
    assert run.data.metrics["resnet34.test_tta.f1_macro"] == pytest.approx(
        metrics["tta"]["f1_macro"])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id,
                                                                      "resnet34")}
    assert "resnet34/training_input.png" in artifacts
