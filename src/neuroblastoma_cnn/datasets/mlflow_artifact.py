"""A versioned file dataset that is also logged as an artifact of the active MLflow run.

Why not kedro-mlflow's ``MlflowArtifactDataset``: it builds the wrapped dataset itself, so a
nested ``versioned: true`` gets its own timestamp instead of the run's save version, and Kedro
1.x refuses a catalog whose datasets disagree on it. Here ``versioned: true`` sits on this entry;
Kedro hands it the run's version, which the wrapped dataset then uses, so the local file and the
MLflow artifact are the same version of the same artifact.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from kedro.io.core import (
    AbstractDataset,
    AbstractVersionedDataset,
    DatasetError,
    Version,
    parse_dataset_definition,
)

from neuroblastoma_cnn.tracking import privacy

logger = logging.getLogger(__name__)


class MlflowArtifactDataset(AbstractVersionedDataset[Any, Any]):
    """Saves through the wrapped file dataset, then logs the saved file to MLflow.

    ``dataset`` is an ordinary catalog definition (``type``, ``filepath``, ...); put
    ``versioned: true`` on this entry, not on the wrapped one. Without an active MLflow run
    the file is saved and nothing is logged.
    """

    def __init__(
        self,
        dataset: dict[str, Any],
        artifact_path: str | None = None,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
        tissue_images: bool = False,
    ):
        config = dict(dataset)
        if config.pop("versioned", None) is not None:
            raise DatasetError(
                "Put 'versioned: true' on the MlflowArtifactDataset entry, not on its 'dataset'."
            )
        dataset_class, dataset_args = parse_dataset_definition(config)
        if version is not None:
            if not issubclass(dataset_class, AbstractVersionedDataset):
                raise DatasetError(f"{dataset_class.__name__} does not support versioning.")
            dataset_args["version"] = version
        self._dataset: AbstractDataset = dataset_class(**dataset_args)
        self._artifact_path = artifact_path
        self._tissue_images = tissue_images  # kept off the tracker by mlflow_privacy
        self.metadata = metadata
        filepath = getattr(self._dataset, "_filepath", None)
        if filepath is None:
            raise DatasetError(f"{dataset_class.__name__} has no file to log to MLflow.")
        super().__init__(filepath=filepath, version=version)

    def _describe(self) -> dict[str, Any]:
        return {"dataset": self._dataset._describe(), "artifact_path": self._artifact_path}

    def load(self) -> Any:
        return self._dataset.load()

    def save(self, data: Any) -> None:
        import mlflow  # noqa: PLC0415  (lazy: the catalog builds this dataset in every command)

        self._dataset.save(data)
        if mlflow.active_run() is None:
            return
        if isinstance(self._dataset, AbstractVersionedDataset) and self._version is not None:
            saved = self._dataset._get_versioned_path(self._dataset.resolve_save_version())
        else:
            saved = self._filepath
        # Group ids scrubbed (a pseudonymised copy is logged), tissue pictures maybe withheld.
        to_log, scratch = privacy.artifact_to_log(Path(str(saved)), data, self._tissue_images)
        try:
            if to_log is not None:
                mlflow.log_artifact(str(to_log), self._artifact_path)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)

    def _exists(self) -> bool:
        return self._dataset.exists()
