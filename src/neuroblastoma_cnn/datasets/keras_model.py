"""Versioned ``.keras`` model files that carry their own preprocessing record.

Why: a model must never be applied with the wrong settings. The record (class names in order,
input size, tile size, stride, tissue threshold...) is written inside the ``.keras`` zip as
``neuroblastoma_cnn.json``, so the file stays self-describing wherever it is copied, and it is
attached again as ``model.preprocessing`` on load. With ``log_to_mlflow`` the same model is also
logged to the active MLflow run in the Keras flavor, with a signature, an input example and the
record as MLflow model metadata.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Any

from kedro.io.core import DatasetError, Version

from .local_versioned import LocalVersionedDataset

logger = logging.getLogger(__name__)

RECORD_ENTRY = "neuroblastoma_cnn.json"
MLFLOW_ARTIFACT_PATH = "model"


def model_record(model: Any) -> dict[str, Any]:
    """The model's preprocessing record as plain JSON types (Keras wraps attributes it tracks)."""
    record = getattr(model, "preprocessing", None) or {}
    return json.loads(json.dumps(dict(record), default=_plain))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, (list, tuple)) or hasattr(value, "__iter__"):
        return list(value)
    return str(value)


def read_record(path: str | Path) -> dict[str, Any]:
    """Reads the preprocessing record stored inside a ``.keras`` file ({} when absent)."""
    with zipfile.ZipFile(path) as archive:
        if RECORD_ENTRY not in archive.namelist():
            return {}
        return json.loads(archive.read(RECORD_ENTRY))


def load_keras_model(path: str | Path) -> Any:
    """Loads a ``.keras`` file and attaches its preprocessing record as ``model.preprocessing``."""
    import keras

    from neuroblastoma_cnn import models  # noqa: F401  (registers the custom layers)

    path = Path(path)
    if not path.exists():
        raise DatasetError(f"Model file '{path}' does not exist.")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as exc:  # keras raises many types for a bad file
        raise DatasetError(f"Could not load Keras model '{path}': {exc}") from exc
    model.preprocessing = read_record(path)
    return model


def save_keras_model(model: Any, path: str | Path) -> None:
    """Saves the model and appends its preprocessing record to the same zip."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(RECORD_ENTRY, json.dumps(model_record(model), indent=2))


class _KerasFlavor:
    """``mlflow.keras`` with its target folder made first.

    MLflow 3.17's ``mlflow.keras.save_model`` writes the input example before it creates the
    model folder, so logging with an input example fails with FileNotFoundError.
    """

    __name__ = "mlflow.keras"

    @staticmethod
    def save_model(path: str, **kwargs: Any) -> None:
        import mlflow.keras

        Path(path).mkdir(parents=True, exist_ok=True)
        mlflow.keras.save_model(path=path, **kwargs)


def pip_requirements() -> list[str]:
    """Keras and the installed TensorFlow build, pinned: what serving the logged model needs.

    Given explicitly because MLflow's own inference reloads the model in a subprocess: slow, and
    when it times out it falls back to `keras` alone with a warning.
    """
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for names in (("keras",), ("tensorflow-cpu", "tensorflow")):
        for name in names:
            try:
                found.append(f"{name}=={version(name)}")
                break
            except PackageNotFoundError:
                continue
    return found


def log_model_to_mlflow(model: Any, artifact_path: str = MLFLOW_ARTIFACT_PATH) -> str | None:
    """Logs the model to the active MLflow run (Keras flavor); returns its URI, None if no run."""
    import mlflow
    import numpy as np
    from mlflow.models import infer_signature

    if mlflow.active_run() is None:
        logger.info("No active MLflow run: model not logged to MLflow.")
        return None
    _, height, width, channels = model.input_shape
    example = np.full((1, height, width, channels), 128, dtype=np.uint8)
    prediction = np.asarray(model.predict(example.astype("float32"), verbose=0))
    signature = infer_signature(example.astype("float32"), prediction)
    info = mlflow.models.Model.log(
        artifact_path=None,
        name=artifact_path,
        flavor=_KerasFlavor,
        model=model,
        signature=signature,
        input_example=example.astype("float32"),
        metadata={"preprocessing": model_record(model)},
        pip_requirements=pip_requirements(),
    )
    # The tag lets people (and the prediction pipeline) find the run's model by name.
    record = model_record(model)
    mlflow.set_tag(f"{record.get('architecture', model.name)}.model_uri", info.model_uri)
    logger.info("Logged model to MLflow: %s", info.model_uri)
    return info.model_uri


class KerasModelDataset(LocalVersionedDataset):
    """Kedro dataset for a ``.keras`` model with an embedded preprocessing record."""

    def __init__(
        self,
        filepath: str,
        log_to_mlflow: bool = False,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
    ):
        if not filepath.endswith(".keras"):
            raise DatasetError(f"Keras 3 models need a '.keras' file name, got '{filepath}'.")
        self._log_to_mlflow = log_to_mlflow
        super().__init__(filepath, version, metadata)

    def _describe(self) -> dict[str, Any]:
        return {**super()._describe(), "log_to_mlflow": self._log_to_mlflow}

    def load(self) -> Any:
        return load_keras_model(self._load_path())

    def save(self, data: Any) -> None:
        save_keras_model(data, self._save_path())
        if self._log_to_mlflow:
            log_model_to_mlflow(data)
