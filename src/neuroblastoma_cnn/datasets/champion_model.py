"""The selection's champion as one versioned artifact, whatever family won: a classical model
(``.joblib``, ``models.selected_floor.ClassicalImageModel``) or a Keras model (``.keras``, a
fold ensemble), each with its preprocessing record and prediction-set calibration inside.

Why one dataset: ``select_model``'s winner is decided at run time, so its node has one output;
``filepath`` is named without a suffix (``data/06_models/champion/model``) and each version
holds ``model.joblib`` or ``model.keras``, the suffix ``predict``, the CLI and the pyfunc
already read. Both are written through a temporary file and renamed: a version is complete or
absent, so nothing half-written is loaded, logged or registered.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kedro.io.core import DatasetError

from neuroblastoma_cnn.models.families import WHOLE_IMAGE_KINDS

from .local_versioned import LocalVersionedDataset

SUFFIXES = (".keras", ".joblib")


def load_model_file(path: str | Path) -> Any:
    """A saved model of any family, by its suffix: a classical or hybrid model (``.joblib``)
    or a ``.keras`` file with its record (what the champion and the raw-image pyfunc hold)."""
    if str(path).endswith(".joblib"):
        from neuroblastoma_cnn.models.selected_floor import load_classical  # noqa: PLC0415

        return load_classical(path)
    from .keras_model import load_keras_model  # noqa: PLC0415  (lazy: TensorFlow)

    return load_keras_model(path)


class ChampionModelDataset(LocalVersionedDataset):
    """``filepath`` without a suffix; local paths only (joblib and Keras write local files).
    The loaded model's ``model_source`` is the file it came from (what the pyfunc logs)."""

    def __init__(self, filepath: str, *args: Any, **kwargs: Any):
        super().__init__(filepath, *args, **kwargs)
        self._glob_function = self._versions  # a version's file is model.<suffix>

    def _versions(self, pattern: str) -> list[str]:
        """The version paths (``.../<version>/model``) that hold a ``model.<suffix>`` file."""
        return sorted({found[: -len(suffix)] for suffix in SUFFIXES
                       for found in self._fs.glob(pattern + suffix)})

    def _files(self, path: Any) -> list[Path]:
        return [Path(f"{path}{suffix}") for suffix in SUFFIXES]

    def _is_complete(self, path: str) -> bool:
        return any(f.is_file() for f in self._files(path))

    def load(self) -> Any:
        found = [f for f in self._files(self._load_path()) if f.is_file()]
        if not found:
            raise DatasetError(f"No champion model at '{self._load_path()}' (.keras or .joblib)")
        model = load_model_file(found[0])
        model.model_source = str(found[0])
        return model

    def save(self, data: Any) -> None:
        if not self.is_local:
            raise DatasetError(f"{self._filepath}: champion models are saved locally only")
        base = Path(self._save_path())
        if getattr(data, "kind", None) in WHOLE_IMAGE_KINDS:  # classical or hybrid
            from neuroblastoma_cnn.models.selected_floor import save_classical  # noqa: PLC0415

            save_classical(data, base.with_name(base.name + ".joblib"))
            return
        from .keras_model import save_keras_model  # noqa: PLC0415  (lazy: TensorFlow)

        target = base.with_name(base.name + ".keras")
        partial = target.with_name(f".{target.name}.partial.keras")
        save_keras_model(data, partial)
        os.replace(partial, target)
