"""A CNN as feature extractor, a scikit-learn head as classifier: identity and application.

The features pipeline fits heads on a model's pooled penultimate features; prediction applies
extractor + head to new images. Both live here (not in a pipeline) because both need them.

A head is only valid on the features of the exact network it was fitted on, so every head
carries the extractor's *identity* (:func:`extractor_identity`); the checks on it live with the
heads' storage format (``datasets/sklearn_heads.py``), which needs no TensorFlow.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from neuroblastoma_cnn.datasets.sklearn_heads import (
    check_head_extractor,
    head_probabilities,
    sha256_json,
    weights_sha256,
)
from neuroblastoma_cnn.preprocessing import preprocessing_of

from . import backbone_and_head


def extractor_identity(model: Any, feature_dim: int, source: str | None = None) -> dict[str, Any]:
    """What a head must remember about the network whose features it was fitted on."""
    record = preprocessing_of(model)
    return {
        "architecture": record.architecture,
        "source": source or str(getattr(model, "model_source", None) or model.name),
        "weights_sha256": weights_sha256(model.get_weights()),
        "record_sha256": sha256_json(record.to_dict()),
        "classes": [str(c) for c in record.classes],
        "feature_dim": int(feature_dim),
        "input_size": int(record.input_size),
    }


class HeadClassifier:
    """Extractor + head with the interface prediction uses on a Keras model.

    ``predict_on_batch`` runs the network up to its pooled features and the head on them;
    ``input_shape``, ``output_shape``, ``preprocessing`` and ``model_source`` are what prediction
    reads, so new images are tiled by the extractor's own record, exactly as for the CNN.
    """

    def __init__(self, model: Any, bundle: Mapping[str, Any], heads_source: str = ""):
        self.backbone, _ = backbone_and_head(model)
        feature_dim = int(self.backbone.output_shape[-1])
        check_head_extractor(bundle, extractor_identity(model, feature_dim))
        self.model = model
        self.bundle = dict(bundle)
        self.head = bundle["model"]
        self.classes = [str(c) for c in bundle["classes"]]
        self.preprocessing = preprocessing_of(model)
        self.input_shape = tuple(model.input_shape)
        self.output_shape = (None, len(self.classes))
        self.name = f"{model.name}+{bundle['name']}"
        where = f" ({heads_source})" if heads_source else ""
        self.model_source = (f"{getattr(model, 'model_source', None) or model.name} + head "
                             f"{bundle['name']}{where}")

    def features(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.backbone.predict_on_batch(batch), dtype=np.float32)

    def predict_on_batch(self, batch: np.ndarray) -> np.ndarray:
        return head_probabilities(self.head, self.features(batch), len(self.classes))
