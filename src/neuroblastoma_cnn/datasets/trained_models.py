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

from neuroblastoma_cnn.core.errors import ModelError
from neuroblastoma_cnn.images.preprocessing import attach_preprocessing
from neuroblastoma_cnn.models import families
from neuroblastoma_cnn.tracking.promotion import PROMOTED, is_usable, read_status

from .keras_model import load_keras_model

logger = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
MLFLOW_SCHEMES = ("models:/", "runs:/")


class ModelSelectionError(ModelError):
    """The requested model does not exist or cannot be used; the message says what exists."""


def is_mlflow_uri(spec: str) -> bool:
    return str(spec).startswith(MLFLOW_SCHEMES)


def _is_file_spec(spec: str) -> bool:
    return spec.endswith((".keras", ".joblib")) or "/" in spec or "\\" in spec


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
        """Usable versions of an architecture's model, oldest first (Kedro versions sort by
        time): saved completely and promoted (trained and evaluated by a run that succeeded)."""
        return [v for v in self.saved_versions(architecture)
                if is_usable(self.models_dir / architecture / MODEL_FILE / v)]

    def saved_versions(self, architecture: str) -> list[str]:
        """Every saved version, promoted or not, oldest first."""
        folder = self.models_dir / architecture / MODEL_FILE
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if (p / MODEL_FILE).is_file())

    def path(self, architecture: str, version: str | None = None) -> Path:
        """The ``.keras`` file of a version (default: the latest) of an architecture's model."""
        versions = self.versions(architecture)
        if not versions:
            raise ModelSelectionError(self._no_model_message(architecture))
        if version is None:
            return self.models_dir / architecture / MODEL_FILE / versions[-1] / MODEL_FILE
        if str(version) not in versions:
            folder = self.models_dir / architecture / MODEL_FILE / str(version)
            status = read_status(folder) if (folder / MODEL_FILE).is_file() else None
            if status and status.get("status") != PROMOTED:
                raise ModelSelectionError(
                    f"Version '{version}' of the '{architecture}' model was never promoted "
                    f"({status.get('status')}"
                    + (f": {status['reason']}" if status.get("reason") else "")
                    + "): its run did not finish training and evaluation. "
                    f"Usable versions: {', '.join(versions[-5:])}."
                )
            shown = ", ".join(versions[-5:])
            raise ModelSelectionError(
                f"No version '{version}' of the '{architecture}' model. "
                f"Latest versions: {shown}."
            )
        return self.models_dir / architecture / MODEL_FILE / str(version) / MODEL_FILE

    def _no_model_message(self, architecture: str) -> str:
        known = self.architectures()
        folder = self.models_dir / architecture / MODEL_FILE
        trained = (f"Trained architectures there: {', '.join(known)}." if known
                   else "No trained model there yet.")
        alternatives = ("give a .keras file or an MLflow model URI (models:/NAME/VERSION, "
                        "runs:/RUN_ID/model)")
        registered = families.trainable()
        if registered and architecture not in registered:
            commands = ", ".join(f"`kedro run --pipeline=train_{m}`" for m in registered)
            return (f"'{architecture}' is not a model this project trains (models: "
                    f"{', '.join(registered)}; {commands}). {trained} Or {alternatives}.")
        unpromoted = [v for v in self.saved_versions(architecture) if v not in known]
        why = (f" ({len(unpromoted)} saved version(s) were never promoted: their runs failed "
               "before evaluation finished)") if unpromoted else ""
        return (f"No trained '{architecture}' model in '{folder}'{why}. Run `kedro run "
                f"--pipeline=train_{architecture}` first, or give another architecture, a "
                f".keras file or an MLflow model URI (models:/NAME/VERSION, runs:/RUN_ID/model)."
                f" {trained}")

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
    if path.suffix == ".joblib":  # a classical model a selection chose (CLASSICAL_SUFFIX)
        from neuroblastoma_cnn.models.selected_floor import (  # noqa: PLC0415  (scikit-learn)
            load_classical,
        )

        try:
            return load_classical(path)
        except ModelError as exc:
            raise ModelSelectionError(str(exc)) from exc
    try:
        model = load_keras_model(path)  # checks the preprocessing record (attach_preprocessing)
    except DatasetError as exc:
        raise ModelSelectionError(str(exc)) from exc
    except ModelError as exc:
        raise ModelSelectionError(str(exc), hint=exc.hint) from exc
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
    """Loads an MLflow Keras model and attaches the preprocessing record from its metadata;
    for the raw-image pyfunc (what the registry holds), the ``.keras`` file logged with it."""
    import mlflow  # noqa: PLC0415  (lazy: MLflow loads only for an MLflow model URI)
    import mlflow.keras  # noqa: PLC0415  (lazy, as mlflow)

    from neuroblastoma_cnn.models.families import register_keras_layers  # noqa: PLC0415

    register_keras_layers()

    try:
        info = mlflow.models.get_model_info(uri)
        if "keras" not in info.flavors:  # the raw-image pyfunc: its .keras file is an artifact
            return _load_pyfunc_keras(uri, info)
        model = mlflow.keras.load_model(uri)
    except ModelSelectionError:
        raise
    except Exception as exc:  # MlflowException, OSError...: all mean "cannot use this URI"
        raise ModelSelectionError(
            f"Could not load MLflow model '{uri}' (tracking URI "
            f"'{mlflow.get_tracking_uri()}'): {exc}"
        ) from exc
    record = dict((info.metadata or {}).get("preprocessing") or {})
    try:
        attach_preprocessing(model, record, uri)
    except ModelError as exc:
        raise ModelSelectionError(str(exc), hint=exc.hint) from exc
    model.model_source = uri
    logger.info("Prediction model: %s", uri)
    return model


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


def _load_pyfunc_keras(uri: str, info: Any) -> Any:
    """The ``.keras`` (or classical ``.joblib``) artifact of a raw-image pyfunc model
    (``serving/pyfunc``), downloaded and loaded with the record inside it."""
    import tempfile  # noqa: PLC0415

    import mlflow  # noqa: PLC0415  (lazy: MLflow)

    artifacts = (info.flavors.get("python_function") or {}).get("artifacts") or {}
    relative = (artifacts.get("model") or {}).get("path")
    if not relative or not str(relative).endswith((".keras", ".joblib")):
        raise ModelSelectionError(
            f"MLflow model '{uri}' is neither a Keras model nor this project's raw-image model "
            f"(flavors: {', '.join(info.flavors)}).")
    with tempfile.TemporaryDirectory(prefix="mlflow-model-") as tmp:
        # The whole model folder: "<uri>/<file>" is misread as a registered name for a logged
        # model's id URI (models:/m-...); the folder holds little beside the file.
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        model = _load_file(Path(local) / relative)
    model.model_source = uri
    logger.info("Prediction model: %s", uri)
    return model
