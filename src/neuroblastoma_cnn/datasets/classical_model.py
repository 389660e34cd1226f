"""A classical model (``models.selected_floor.ClassicalImageModel``) as a versioned file: what
``select_model`` saves as its champion and ``predict`` / the pyfunc load like a ``.keras``.

Written through a temporary file and renamed (``save_classical``), so a version is either
complete or absent: nothing half-written is loaded, logged or registered.
"""

from __future__ import annotations

from typing import Any

from kedro.io.core import DatasetError

from .local_versioned import LocalVersionedDataset


class ClassicalModelDataset(LocalVersionedDataset):
    """``filepath`` ends in ``.joblib``; local paths only (the model is read with joblib)."""

    def load(self) -> Any:
        from neuroblastoma_cnn.models.selected_floor import load_classical  # noqa: PLC0415

        return load_classical(self._load_path())

    def save(self, data: Any) -> None:
        from neuroblastoma_cnn.models.selected_floor import save_classical  # noqa: PLC0415

        if not self.is_local:
            raise DatasetError(f"{self._filepath}: classical models are saved locally only")
        save_classical(data, self._save_path())
