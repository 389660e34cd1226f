"""Finds and loads a model for prediction: by architecture, catalog version, file or MLflow URI.

Why a dataset that hands over a :class:`TrainedModels` object rather than a model: *which* model
to apply is a parameter (``predict.model`` / ``predict.version``), and Kedro datasets cannot read
parameters. The dataset says *where* models live (the versioned models folder; MLflow's store is
the one kedro-mlflow configured), a node picks one with the parameters, and the command line does
the same through the same :meth:`TrainedModels.load`.

Every model comes back with its preprocessing record as ``model.preprocessing`` (from the
``.keras`` zip, or from the MLflow model's ``metadata["preprocessing"]``) and a ``model_source``
string saying exactly which model it is. A model without a record is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kedro.io.core import AbstractDataset, DatasetError

logger = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
MLFLOW_SCHEMES = ("models:/", "runs:/")


class ModelSelectionError(ValueError):
    """The requested model does not exist or cannot be used; the message says what exists."""


def is_mlflow_uri(spec: str) -> bool:
    return str(spec).startswith(MLFLOW_SCHEMES)


def _is_file_spec(spec: str) -> bool:
    return spec.endswith(".keras") or "/" in spec or "\\" in spec


class TrainedModels:
    """The trained models of a project: ``<models_dir>/<arch>/model.keras/<version>/model.keras``
    written by the training pipelines, plus any ``.keras`` file or MLflow model URI."""

    def __init__(self, models_dir: str | Path = "data/06_models"):
        self.models_dir = Path(models_dir)

    def __repr__(self) -> str:
        return f"TrainedModels('{self.models_dir}')"

    def architectures(self) -> list[str]:
        """Architectures with at least one saved version."""
        if not self.models_dir.is_dir():
            return []
        return sorted(p.name for p in self.models_dir.iterdir() if self.versions(p.name))

    def versions(self, architecture: str) -> list[str]:
        """Saved versions of an architecture's model, oldest first (Kedro versions sort by time)."""
        folder = self.models_dir / architecture / MODEL_FILE
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if (p / MODEL_FILE).is_file())

    def path(self, architecture: str, version: str | None = None) -> Path:
        """The ``.keras`` file of a version (default: the latest) of an architecture's model."""
        versions = self.versions(architecture)
        if not versions:
            known = self.architectures()
            folder = self.models_dir / architecture / MODEL_FILE
            raise ModelSelectionError(
                f"No trained '{architecture}' model in '{folder}'. Run `kedro run "
                f"--pipeline=train_{architecture}` first, or give another architecture, a .keras "
                "file or an MLflow model URI (models:/NAME/VERSION, runs:/RUN_ID/model). "
                + (f"Trained architectures there: {', '.join(known)}." if known else
                   "No trained model there yet.")
            )
        if version is None:
            return self.models_dir / architecture / MODEL_FILE / versions[-1] / MODEL_FILE
        if str(version) not in versions:
            shown = ", ".join(versions[-5:])
            raise ModelSelectionError(
                f"No version '{version}' of the '{architecture}' model. "
                f"Latest versions: {shown}."
            )
        return self.models_dir / architecture / MODEL_FILE / str(version) / MODEL_FILE

    def load(self, spec: str, version: str | None = None) -> Any:
        """Loads the model named by ``spec`` with its preprocessing record.

        ``spec``: an architecture name (its latest version, or ``version``), a ``.keras`` file,
        or an MLflow model URI (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``,
        ``runs:/RUN_ID/model``).
        """
        spec = str(spec or "").strip()
        if not spec:
            raise ModelSelectionError("No model given: name an architecture, a .keras file or an "
                                      "MLflow model URI.")
        version = None if version in (None, "") else str(version)
        if is_mlflow_uri(spec):
            if version is not None:
                raise ModelSelectionError(
                    f"A version ('{version}') applies to an architecture name, not to the MLflow "
                    f"URI '{spec}' (put the version in the URI: models:/NAME/VERSION)."
                )
            return load_mlflow_model(spec)
        if _is_file_spec(spec):
            if version is not None:
                raise ModelSelectionError(
                    f"A version ('{version}') applies to an architecture name, not to the file "
                    f"'{spec}'."
                )
            path = Path(spec)
            if not path.is_file():
                raise ModelSelectionError(f"Model file '{spec}' does not exist.")
            return _load_file(path)
        return _load_file(self.path(spec, version))


def _load_file(path: Path) -> Any:
    from .keras_model import load_keras_model

    try:
        model = load_keras_model(path)
    except DatasetError as exc:
        raise ModelSelectionError(str(exc)) from exc
    _require_record(model.preprocessing, str(path))
    model.model_source = _shown(path)
    logger.info("Prediction model: %s", model.model_source)
    return model


def _shown(path: Path) -> str:
    """The path relative to the working directory when inside it (as in a Kedro project), so
    the same model reads the same whether the catalog made its path absolute or not."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def load_mlflow_model(uri: str) -> Any:
    """Loads an MLflow Keras model and attaches the preprocessing record from its metadata."""
    import mlflow
    import mlflow.keras

    from neuroblastoma_cnn import models  # noqa: F401  (registers the custom layers)

    try:
        info = mlflow.models.get_model_info(uri)
        model = mlflow.keras.load_model(uri)
    except Exception as exc:  # MlflowException, OSError...: all mean "cannot use this URI"
        raise ModelSelectionError(
            f"Could not load MLflow model '{uri}' (tracking URI "
            f"'{mlflow.get_tracking_uri()}'): {exc}"
        ) from exc
    record = dict((info.metadata or {}).get("preprocessing") or {})
    _require_record(record, uri)
    model.preprocessing = record
    model.model_source = uri
    logger.info("Prediction model: %s", uri)
    return model


def _require_record(record: Any, where: str) -> None:
    if not record or not record.get("ingestion") or not record.get("classes"):
        raise ModelSelectionError(
            f"Model '{where}' carries no preprocessing record (classes and ingestion "
            "parameters), so it cannot be applied with the settings it was trained with. Use a "
            "model saved by this project's training pipeline."
        )


class TrainedModelsDataset(AbstractDataset[Any, TrainedModels]):
    """Read-only catalog entry for the models folder; ``load`` returns :class:`TrainedModels`."""

    def __init__(self, path: str = "data/06_models", metadata: dict[str, Any] | None = None):
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> TrainedModels:
        return TrainedModels(self._path)

    def save(self, data: Any) -> None:
        raise DatasetError(
            f"'{self._path}' is written by the training pipelines (KerasModelDataset), not here."
        )

    def _exists(self) -> bool:
        return self._path.is_dir()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}
