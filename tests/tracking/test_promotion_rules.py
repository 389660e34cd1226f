"""Promotion: only a model whose run trained and evaluated it is picked by `predict`; a model
that did not learn is flagged."""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from kedro.io.core import Version
from kedro.pipeline import Node

from neuroblastoma_cnn.cli.commands import main
from neuroblastoma_cnn.core.errors import ModelError
from neuroblastoma_cnn.datasets import KerasModelDataset, TrainedModels
from neuroblastoma_cnn.datasets.trained_models import ModelSelectionError
from neuroblastoma_cnn.hooks import ModelPromotionHook
from neuroblastoma_cnn.tracking import promotion

V1, V2, V3 = "2026-01-01T00.00.00.000Z", "2026-02-01T00.00.00.000Z", "2026-03-01T00.00.00.000Z"


def _history(val_loss, predicted=None):
    frame = pd.DataFrame({"epoch": range(1, len(val_loss) + 1), "val_loss": val_loss})
    if predicted is not None:
        frame["val_predicted_classes"] = predicted
    return frame


def test_a_constant_validation_loss_or_a_single_class_is_untrained():
    assert promotion.untrained_reasons(_history([12.0886, 12.0886])) == [
        "validation loss constant at 12.0886 over 2 epochs"]
    assert promotion.untrained_reasons(_history([1.2, 0.9])) == []
    assert promotion.untrained_reasons(_history([1.2])) == []  # one epoch: nothing to compare
    for single in (1, "NB", '["NB"]'):
        reasons = promotion.untrained_reasons(_history([1.2, 0.9], [3, single]))
        assert len(reasons) == 1 and "one class predicted for every validation image" in reasons[0]
    for several in (2, "NB;GN", '["NB", "GN"]'):
        assert promotion.untrained_reasons(_history([1.2, 0.9], [1, several])) == []
    images = pd.DataFrame({"predicted": ["NB", "NB", "NB"]})
    assert "one class (NB) predicted for every test image" in promotion.single_class_reason(images)
    assert promotion.single_class_reason(pd.DataFrame({"predicted": ["NB", "GN"]})) is None


def _fake_model_version(models: Path, version: str, status: str | None) -> None:
    folder = models / "resnet34" / "model.keras" / version
    folder.mkdir(parents=True)
    (folder / "model.keras").write_bytes(b"PK")
    if status:
        promotion.write_status(folder, status, reason="boom" if status == "failed" else None)


def test_predict_picks_only_promoted_versions(tmp_path):
    models = tmp_path / "06_models"
    _fake_model_version(models, V1, None)  # saved before promotion existed: usable
    _fake_model_version(models, V2, "promoted")
    _fake_model_version(models, V3, "failed")
    _fake_model_version(models, "2026-04-01T00.00.00.000Z", "pending")  # a run still going
    trained = TrainedModels(models)
    assert trained.versions("resnet34") == [V1, V2]
    assert trained.path("resnet34").parent.name == V2
    with pytest.raises(ModelSelectionError, match=r"never promoted \(failed: boom\)"):
        trained.path("resnet34", V3)
    only_failed = tmp_path / "other"
    _fake_model_version(only_failed, V3, "failed")
    with pytest.raises(ModelSelectionError, match=r"1 saved version\(s\) were never promoted"):
        TrainedModels(only_failed).path("resnet34")


def _tiny_model() -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, outputs, name="tiny")
    model.preprocessing = {"classes": ["a", "b"], "architecture": "resnet34"}
    return model


def test_a_promoted_dataset_saves_pending_then_promotes(tmp_path):
    dataset = KerasModelDataset(str(tmp_path / "model.keras"), promotion=True,
                                version=Version(None, V1))
    dataset.save(_tiny_model())
    folder = tmp_path / "model.keras" / V1
    assert promotion.read_status(folder)["status"] == "pending"
    assert not promotion.is_usable(folder)
    dataset.promote(epochs=2)
    status = promotion.read_status(folder)
    assert status["status"] == "promoted" and status["epochs"] == 2
    assert promotion.is_usable(folder)

    failed = KerasModelDataset(str(tmp_path / "model.keras"), promotion=True,
                               version=Version(None, V2))
    failed.save(_tiny_model())
    failed.mark_failed("AttributeError: boom")
    status = promotion.read_status(tmp_path / "model.keras" / V2)
    assert (status["status"], status["reason"]) == ("failed", "AttributeError: boom")


def test_training_without_an_epoch_stops_before_the_model_is_saved():
    hook = ModelPromotionHook()
    hook._models = {"resnet34": "resnet34.model"}
    node = Node(lambda *a: None, inputs="x", outputs=["resnet34.model",
                                                      "resnet34.training_history"],
                name="train_model", namespace="resnet34")
    with pytest.raises(ModelError, match="Training of resnet34 finished no epoch"):
        hook.after_node_run(node=node, outputs={"resnet34.model": object(),
                                                "resnet34.training_history": pd.DataFrame()})


@pytest.fixture
def tmp_mlflow(tmp_path):
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("untrained")  # not an experiment id another store left active
    yield
    mlflow.set_tracking_uri(previous)


@pytest.mark.usefixtures("tmp_mlflow")
def test_a_model_that_did_not_learn_is_flagged_in_the_log_and_the_run(caplog):
    hook = ModelPromotionHook()
    hook._models = {"resnet34": "resnet34.model"}
    node = Node(lambda *a: None, inputs="x", outputs=["resnet34.model",
                                                      "resnet34.training_history"],
                name="train_model", namespace="resnet34")
    with mlflow.start_run() as run, caplog.at_level(logging.WARNING):
        hook.after_node_run(node=node, outputs={
            "resnet34.model": object(),
            "resnet34.training_history": _history([12.0886, 12.0886])})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["resnet34 did not learn: validation loss constant at 12.0886 over 2 "
                        "epochs. Check the learning rate, the optimizer and the data before "
                        "using this model."]
    tags = mlflow.get_run(run.info.run_id).data.tags
    assert tags["resnet34.untrained"] == "validation loss constant at 12.0886 over 2 epochs"


def test_a_corrupt_keras_file_is_not_reported_as_missing(tmp_path):
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(ModelSelectionError) as caught:
        TrainedModels(tmp_path).load(str(corrupt))
    message = caught.value.one_line()
    assert "is not a Keras model: not a .keras zip archive" in message
    assert "not found" not in message.lower() and "does not exist" not in message
    # A zip that is not a Keras model: Keras' own reason, still not "not found".
    other = tmp_path / "other.keras"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("notes.json", json.dumps({"a": 1}))
    with pytest.raises(ModelSelectionError, match="Could not load Keras model") as caught:
        TrainedModels(tmp_path).load(str(other))
    with pytest.raises(ModelSelectionError, match="does not exist"):
        TrainedModels(tmp_path).load(str(tmp_path / "missing.keras"))


def test_an_unknown_architecture_suggests_the_registered_pipelines(tmp_path):
    with pytest.raises(ModelSelectionError) as caught:
        TrainedModels(tmp_path).load("resnet18")
    message = caught.value.one_line()
    assert "'resnet18' is not a model this project trains" in message
    assert "`kedro run --pipeline=train_resnet34`" in message
    assert "`kedro run --pipeline=train_resnet50`" in message
    assert "train_resnet18" not in message
    with pytest.raises(ModelSelectionError, match="Run `kedro run --pipeline=train_resnet50`"):
        TrainedModels(tmp_path).load("resnet50")  # registered, just not trained yet


def test_the_command_reports_a_corrupt_model_and_an_unknown_name_in_one_line(tmp_path, capsys):
    image = tmp_path / "image.png"
    image.write_bytes(b"not read: the model is checked first")
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(b"\x00" * 4096)
    assert main(["predict", str(image), "-m", str(corrupt)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"Model file '{corrupt}' is not a Keras model" in err
    assert "not found" not in err.lower()

    assert main(["predict", str(image), "-m", "resnet18",
                 "--models-dir", str(tmp_path / "models")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'resnet18' is not a model this project trains" in err
    assert "--pipeline=train_resnet34" in err and "train_resnet18" not in err
