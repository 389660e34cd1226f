"""The Model Registry on a temporary SQLite store: versions with the run's key metrics as tags,
``champion`` moving only when allowed and not worse, and ``models:/<name>@champion`` loading
through the same path ``predict`` and ``neuroblastoma-cnn predict -m`` use."""

from __future__ import annotations

import keras
import mlflow
import numpy as np
import pytest
from _params import store_metadata

from neuroblastoma_cnn.datasets.keras_model import log_model_to_mlflow
from neuroblastoma_cnn.datasets.trained_models import TrainedModels
from neuroblastoma_cnn.images.preprocessing import Preprocessing
from neuroblastoma_cnn.tracking import registry


@pytest.fixture
def store(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("registry_test")
    yield tmp_path


def _logged_model(temperature: float | None) -> str:
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, outputs, name="tiny")
    model.preprocessing = Preprocessing.from_metadata(store_metadata(["a", "b"], 8), "t") \
        .model_copy(update={"architecture": "resnet34"}).with_temperature(temperature)
    return log_model_to_mlflow(model, name="resnet34")


def _metrics(f1: float) -> dict:
    return {"f1_macro": f1, "accuracy": 0.5, "macro_f1_ci": {"low": f1 - 0.2, "high": f1 + 0.1},
            "n_test_images": 10, "calibration": {"ece_before": 0.2, "ece_after": 0.1,
                                                 "temperature": 1.5}}


def test_champion_moves_only_when_allowed_and_not_worse(store):
    name = registry.registered_name("registry_test", "resnet34")
    assert name == "registry_test-resnet34"
    versions = []
    for f1, allowed in [(0.6, True), (0.5, True), (0.9, False), (0.6, True)]:
        with mlflow.start_run() as run:
            uri = _logged_model(temperature=1.5 if f1 == 0.6 else None)
            versions.append(registry.register_version(uri, name, _metrics(f1), allowed,
                                                      run_id=run.info.run_id))
    assert versions == [("1", True), ("2", False), ("3", False), ("4", True)]  # a tie moves it
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias(name, "champion").version) == "4"
    tags = client.get_model_version(name, "1").tags
    assert tags["test_f1_macro"] == "0.6" and tags["test_f1_macro_low"] == "0.4"
    assert tags["test_ece_after"] == "0.1" and tags["temperature"] == "1.5"
    assert tags["run_id"] and tags["champion_at_registration"] == "yes"

    model = TrainedModels("unused").load(f"models:/{name}@champion")
    assert model.model_source == f"models:/{name}@champion"
    assert model.preprocessing.temperature == 1.5 and model.preprocessing.classes == ("a", "b")
    assert np.asarray(model.predict(np.zeros((1, 8, 8, 3), "float32"), verbose=0)).shape == (1, 2)


def test_rules_without_a_metric_or_against_a_champion_without_one():
    assert not registry.should_take_champion({}, None, allowed=True)
    assert registry.should_take_champion({"test_f1_macro": "0.1"}, {}, allowed=True)
    assert not registry.should_take_champion({"test_f1_macro": "0.9"}, None, allowed=False)
    assert registry.key_metric_tags(None) == {}
