"""The stacked hybrid as a model that classifies image files: its base models (a CNN fold
ensemble, a classical model) each give an image's probabilities, the meta-learner
(``models.stacking.StackedHybrid``) combines them.

Why here (serving) and not in models: a CNN base classifies a file through the serving code
(tiles, tissue checks, stain record, the mean of its tiles), exactly as when it is served
alone, so the hybrid sees at serving time what it was fitted on. It is a whole-image model to
``predict_files`` (one answer a file, no tile table), saved as one ``.joblib`` by
``models.selected_floor.save_classical``: a Keras base travels inside as its ``.keras`` bytes
(preprocessing record included) and is loaded with it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from neuroblastoma_cnn.analysis.predictions import probability_column
from neuroblastoma_cnn.images.decoding import ImageRejected
from neuroblastoma_cnn.images.preprocessing import Preprocessing, preprocessing_of
from neuroblastoma_cnn.models.stacking import StackedHybrid
from neuroblastoma_cnn.params import PredictParams


class HybridImageModel:
    """``predict_file(path)``: the hybrid's probabilities over ``preprocessing.classes``.

    ``bases`` maps each of ``hybrid.bases`` to its served model: a classical model
    (``predict_file``) or a Keras model with its record (tiled by ``serving.tiles``).
    """

    kind = "hybrid"  # in families.WHOLE_IMAGE_KINDS: one answer a file, no tiles

    def __init__(self, hybrid: StackedHybrid, bases: dict[str, Any],
                 preprocessing: Preprocessing, settings: PredictParams):
        missing = [b for b in hybrid.bases if b not in bases]
        if missing:
            raise ValueError(f"Hybrid: no served model for base(s) {missing}")
        if list(preprocessing.classes) != list(hybrid.classes_):
            raise ValueError(f"Hybrid: record classes {list(preprocessing.classes)} differ "
                             f"from the meta-learner's {hybrid.classes_}")
        self.hybrid = hybrid
        self.bases = dict(bases)
        self.preprocessing = preprocessing
        self.settings = settings.model_copy(update={"gradcam": False, "tta": False,
                                                    "workers": 1})
        self.name = preprocessing.architecture or "hybrid"
        self.family = self.name  # Grad-CAM asks; the hybrid family says it has none
        self.model_source = self.name

    def _base_probabilities(self, name: str, path: Path) -> np.ndarray:
        """One base's probabilities of the file, in the hybrid's class order."""
        from .tiles import predict_files  # noqa: PLC0415  (tiles dispatches back here)

        classes = [str(c) for c in self.preprocessing.classes]
        answers, _ = predict_files([(path.name, path)], self.bases[name], self.settings)
        row = answers.iloc[0]
        if bool(row["rejected"]):
            raise ImageRejected(path, f"{name}: {row['reason']}")
        return np.array([[float(row[probability_column(c)]) for c in classes]])

    def predict_file(self, path: Path) -> np.ndarray:
        """The file's probabilities (``ImageRejected`` when a base cannot read it)."""
        path = Path(path)
        prob = {b: self._base_probabilities(b, path) for b in self.hybrid.bases}
        return self.hybrid.predict_proba(prob)[0]

    # Pickling: a Keras base as its .keras bytes, loaded again on first use.
    def __getstate__(self) -> dict[str, Any]:
        from neuroblastoma_cnn.datasets.keras_model import save_keras_model  # noqa: PLC0415

        state = dict(self.__dict__)
        bases = {}
        for name, base in self.bases.items():
            if getattr(base, "kind", None) is None and hasattr(base, "save"):  # Keras
                with tempfile.TemporaryDirectory(prefix="hybrid-") as tmp:
                    file = Path(tmp) / f"{name}.keras"
                    save_keras_model(base, file)
                    bases[name] = _KerasBytes(file.read_bytes())
            else:
                bases[name] = base
        state["bases"] = bases
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.bases = {n: b.load() if isinstance(b, _KerasBytes) else b
                      for n, b in self.bases.items()}


class _KerasBytes:
    """A Keras base model's saved file, as bytes inside the hybrid's ``.joblib``."""

    def __init__(self, data: bytes):
        self.data = data

    def load(self) -> Any:
        from neuroblastoma_cnn.datasets.keras_model import load_keras_model  # noqa: PLC0415

        with tempfile.TemporaryDirectory(prefix="hybrid-") as tmp:
            file = Path(tmp) / "base.keras"
            file.write_bytes(self.data)
            model = load_keras_model(file)
        preprocessing_of(model)  # the record came with it
        return model
