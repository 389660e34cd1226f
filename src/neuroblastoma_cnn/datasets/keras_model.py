"""Versioned ``.keras`` model files that carry their own preprocessing record.

Why: a model must never be applied with the wrong settings. The record (class names in order,
input size, tile size, stride, tissue threshold...) is written inside the ``.keras`` zip as
``neuroblastoma_cnn.json``, so the file stays self-describing wherever it is copied, and it is
attached again as ``model.preprocessing`` on load. With ``log_to_mlflow`` the same model is also
logged to the active MLflow run in the Keras flavor, named after its architecture, with a
signature, an input example and the record as MLflow model metadata.

The MLflow model's ``data/model.keras`` is the catalog file itself: MLflow is handed the saved
bytes (not a second ``model.save``), and when its artifact store is a local folder on the same
file system the artifact is then made a hard link of the catalog file, so a model is stored
once on disk however many places name it.

With ``promotion``, saving writes ``promotion.json: pending`` before the model, and the model
is logged to MLflow only when ``hooks.ModelPromotionHook`` promotes it after its evaluation
(see ``neuroblastoma_cnn.tracking.promotion``).
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
from kedro.io.core import DatasetError, Version

from neuroblastoma_cnn.core.storage import FsPath, is_local
from neuroblastoma_cnn.images.preprocessing import attach_preprocessing
from neuroblastoma_cnn.tracking.promotion import FAILED, PENDING, PROMOTED, write_status

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


def load_keras_model(path: str | Path, where: str | None = None) -> Any:
    """Loads a ``.keras`` file and attaches its preprocessing record as ``model.preprocessing``.

    A missing or corrupt file is reported before TensorFlow is loaded (and a corrupt one as
    such: Keras says "File not found" of any file that is not a zip archive). ``where``: the
    name to report instead of ``path`` (the URL of a model downloaded to ``path``)."""
    path = Path(path)
    shown = where or str(path)
    if not path.exists():
        raise DatasetError(f"Model file '{shown}' does not exist.")
    if not zipfile.is_zipfile(path):
        raise DatasetError(
            f"Model file '{shown}' is not a Keras model: not a .keras zip archive (corrupt, "
            "truncated or another format)."
        )
    import keras  # noqa: PLC0415  (lazy: TensorFlow loads only when a model is used)

    from neuroblastoma_cnn.models.families import register_keras_layers  # noqa: PLC0415

    register_keras_layers()  # the project's own layers, before Keras reads the file

    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as exc:  # keras raises many types for a bad file
        raise DatasetError(f"Could not load Keras model '{shown}': {exc}") from exc
    attach_preprocessing(model, read_record(path), shown)  # the one record check
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
        import mlflow.keras  # noqa: PLC0415  (lazy: MLflow loads only when a model is logged)

        Path(path).mkdir(parents=True, exist_ok=True)
        mlflow.keras.save_model(path=path, **kwargs)


class _SavedModel:
    """A Keras model whose ``save`` copies the file it was already saved to.

    MLflow's Keras flavor calls ``model.save(<folder>/data/model.keras)``; handing it this
    wrapper puts the catalog's bytes there (record included) instead of serialising again.
    """

    def __init__(self, model: Any, source: Path) -> None:
        self._model = model
        self._source = Path(source)

    def save(self, path: str, **kwargs: Any) -> None:
        shutil.copyfile(self._source, path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def local_artifact_dir(uri: str | None) -> Path | None:
    """A ``file:`` or plain-path artifact location as a local folder; None for remote stores."""
    if not uri:
        return None
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # relative path, or a Windows drive
        return Path(uri)
    return None


def link_artifact_to_source(artifact: Path, source: Path) -> bool:
    """Replaces ``artifact`` (a byte-identical copy of ``source``) with a hard link to it.

    Returns False, leaving the copy, when they are on different file systems, differ, or
    linking fails. The content never changes: the file is swapped atomically for the same bytes.
    """
    try:
        if artifact.stat().st_ino == source.stat().st_ino:
            return True
        if (artifact.stat().st_dev != source.stat().st_dev
                or artifact.stat().st_size != source.stat().st_size):
            return False
        if not filecmp.cmp(artifact, source, shallow=False):
            return False
        tmp = artifact.with_name(f".{artifact.name}.link")
        os.link(source, tmp)
        os.replace(tmp, artifact)
        return True
    except OSError as exc:
        logger.info("Model artifact '%s' kept as a copy (%s)", artifact, exc)
        return False


def pip_requirements() -> list[str]:
    """Keras and the installed TensorFlow build, pinned: what serving the logged model needs.

    Given explicitly because MLflow's own inference reloads the model in a subprocess: slow, and
    when it times out it falls back to `keras` alone with a warning.
    """
    found = []
    for names in (("keras",), ("tensorflow-cpu", "tensorflow")):
        for name in names:
            try:
                found.append(f"{name}=={metadata.version(name)}")
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def log_model_to_mlflow(model: Any, name: str | None = None,
                        source_file: str | Path | None = None) -> str | None:
    """Logs the model to the active MLflow run (Keras flavor); returns its URI, None if no run.

    ``name``: the logged model's name, by default its architecture (``resnet34``...).
    ``source_file``: the ``.keras`` file the model was saved to; MLflow then stores those bytes,
    hard-linked to the file when possible (see the module's docstring).
    """
    import mlflow  # noqa: PLC0415  (lazy: MLflow loads only when a model is logged)
    from mlflow.models import infer_signature  # noqa: PLC0415  (lazy, as mlflow)

    if mlflow.active_run() is None:
        logger.info("No active MLflow run: model not logged to MLflow.")
        return None
    record = model_record(model)
    name = name or str(record.get("architecture") or model.name or MLFLOW_ARTIFACT_PATH)
    _, height, width, channels = model.input_shape
    example = np.full((1, height, width, channels), 128, dtype=np.uint8)
    # predict_on_batch: Keras' predict batches the array through tf.data, which under op
    # determinism makes TensorFlow print a native "NodeDef mentions attribute" line.
    prediction = np.asarray(model.predict_on_batch(example.astype("float32")))
    signature = infer_signature(example.astype("float32"), prediction)
    info = mlflow.models.Model.log(
        artifact_path=None,
        name=name,
        flavor=_KerasFlavor,
        model=_SavedModel(model, Path(source_file)) if source_file else model,
        signature=signature,
        input_example=example.astype("float32"),
        metadata={"preprocessing": model_record(model)},
        pip_requirements=pip_requirements(),
    )
    # The tag lets people (and the prediction pipeline) find the run's model by name.
    mlflow.set_tag(f"{name}.model_uri", info.model_uri)
    if source_file:
        _store_once(info, Path(source_file))
    logger.info("Logged model to MLflow: %s", info.model_uri)
    return info.model_uri


def _store_once(info: Any, source: Path) -> None:
    """Makes the logged model's ``data/model.keras`` a hard link of the catalog file."""
    import mlflow  # noqa: PLC0415  (lazy: MLflow loads only when a model is logged)

    try:
        location = mlflow.get_logged_model(info.model_id).artifact_location
    except Exception as exc:  # an older store: keep the copy
        logger.info("Logged model kept as a copy: %s", exc)
        return
    folder = local_artifact_dir(location)
    artifact = folder / "data" / "model.keras" if folder else None
    if artifact is None or not artifact.is_file():
        return
    if link_artifact_to_source(artifact, source):
        logger.info("MLflow model %s stores the catalog file '%s' (hard link)",
                    info.model_uri, source)


@contextlib.contextmanager
def local_copy(path: Path | FsPath) -> Iterator[Path]:
    """A local file with the model's bytes: the path itself, or a download of a remote file
    (Keras reads and writes only local files) removed afterwards."""
    if is_local(path):
        yield Path(path)
        return
    if not path.exists():
        raise DatasetError(f"Model file '{path}' does not exist.")
    with tempfile.TemporaryDirectory(prefix="keras-model-") as tmp:
        local = Path(tmp) / path.name
        path.fs.get_file(path.path, str(local))
        yield local


class KerasModelDataset(LocalVersionedDataset):
    """Kedro dataset for a ``.keras`` model with an embedded preprocessing record.

    ``log_to_mlflow``: also log the model to the active MLflow run (named
    ``mlflow_model_name``, by default its architecture; at save, or with
    ``promotion`` when it is promoted). ``promotion``: the saved model stays ``pending`` (never
    picked by ``predict``) until :meth:`promote`. On an fsspec URL (``s3://...``) the model is
    saved to a local temporary file and uploaded; loading downloads it first.
    """

    def __init__(
        self,
        filepath: str,
        log_to_mlflow: bool = False,
        promotion: bool = False,
        mlflow_model_name: str | None = None,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
    ):
        if not filepath.endswith(".keras"):
            raise DatasetError(f"Keras 3 models need a '.keras' file name, got '{filepath}'.")
        self._log_to_mlflow = log_to_mlflow
        self._promotion = promotion
        self._mlflow_name = mlflow_model_name
        super().__init__(filepath, version, metadata, credentials, fs_args)

    def _describe(self) -> dict[str, Any]:
        return {**super()._describe(), "log_to_mlflow": self._log_to_mlflow,
                "promotion": self._promotion}

    @property
    def promotion(self) -> bool:
        return self._promotion

    @property
    def log_to_mlflow(self) -> bool:
        return self._log_to_mlflow

    @property
    def mlflow_model_name(self) -> str | None:
        """The name the model is logged under in MLflow (None: its architecture)."""
        return self._mlflow_name

    def load(self) -> Any:
        path = self._load_path()
        with local_copy(path) as local:
            return load_keras_model(local, where=str(path))

    def save(self, data: Any) -> None:
        path = self._save_path()
        if self._promotion:
            write_status(path.parent, PENDING)  # first: a crash leaves an unusable model
        with self._writing(path) as local:
            save_keras_model(data, local)
            if self._log_to_mlflow and not self._promotion:
                log_model_to_mlflow(data, name=self._mlflow_name, source_file=local)

    @contextlib.contextmanager
    def _writing(self, path: Path | FsPath) -> Iterator[Path]:
        """The local file to save to; for a remote path, uploaded when the block ends."""
        if is_local(path):
            yield Path(path)
            return
        with tempfile.TemporaryDirectory(prefix="keras-model-") as tmp:
            local = Path(tmp) / path.name
            yield local
            path.fs.put_file(str(local), path.path)
        self._invalidate_cache()

    def saved_path(self) -> Path | FsPath:
        """The file this run saved (or would save) the model to."""
        return self._as_path(self._get_versioned_path(self.resolve_save_version()))

    def promote(self, **fields: Any) -> str | None:
        """Marks the saved model usable and, with ``log_to_mlflow``, logs it to the active
        MLflow run; returns the MLflow model URI (None when not logged)."""
        path = self.saved_path()
        uri = None
        if self._log_to_mlflow:
            with local_copy(path) as local:
                uri = log_model_to_mlflow(load_keras_model(local, where=str(path)),
                                          name=self._mlflow_name, source_file=local)
        write_status(path.parent, PROMOTED, mlflow_model_uri=uri, **fields)
        return uri

    def mark_failed(self, reason: str) -> None:
        """Records why the saved model was not promoted (it stays unusable)."""
        path = self.saved_path()
        if path.exists():
            write_status(path.parent, FAILED, reason=reason)
