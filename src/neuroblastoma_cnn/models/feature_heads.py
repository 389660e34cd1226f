"""A CNN as feature extractor, a scikit-learn head as classifier: identity and application.

The features pipeline fits heads on a model's pooled penultimate features; prediction applies
extractor + head to new images. Both live here (not in a pipeline) because both need them.

A head is only valid on the features of the exact network it was fitted on, so every head
carries the extractor's *identity* (:func:`extractor_identity`), checked by
:func:`check_head_extractor` wherever a head meets a network. Finding a saved head for a model
is the heads' storage's (``datasets/sklearn_heads.py``). TensorFlow is imported only when a head
is applied.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from neuroblastoma_cnn.core.errors import ModelError
from neuroblastoma_cnn.images.preprocessing import preprocessing_of
from neuroblastoma_cnn.models import families


def sha256_json(value: Any) -> str:
    """Hash of a JSON-able value, independent of key order."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def weights_sha256(weights: Sequence[np.ndarray]) -> str:
    """Hash of a network's weights (dtype, shape and bytes of each array, in order): the same
    file loaded twice gives the same hash, a retrained model another, whatever its path."""
    digest = hashlib.sha256()
    for weight in weights:
        array = np.ascontiguousarray(weight)
        digest.update(str((array.dtype.str, array.shape)).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


#: Identity keys a head and its extractor must agree on, with how an error names them.
MATCHED_KEYS = (("weights_sha256", "weights"), ("record_sha256", "preprocessing record"),
                ("classes", "classes"), ("feature_dim", "feature dimension"),
                ("architecture", "architecture"))


def _short(value: Any) -> Any:
    return value[:12] if isinstance(value, str) and len(value) == 64 else value


def check_head_extractor(bundle: Mapping[str, Any], extractor: Mapping[str, Any]) -> None:
    """Refuses a head fitted on another extractor's features, naming what differs."""
    fitted = dict(bundle.get("extractor") or {})
    problems = [f"{what} {_short(fitted.get(key))!r} vs {_short(extractor.get(key))!r}"
                for key, what in MATCHED_KEYS if fitted.get(key) != extractor.get(key)]
    if problems:
        arch = extractor.get("architecture") or fitted.get("architecture") or "<model>"
        raise ModelError(
            f"Head '{bundle.get('name', '?')}' was fitted on features of "
            f"{fitted.get('architecture')} model '{fitted.get('source')}', not of "
            f"'{extractor.get('source')}': "
            + "; ".join(problems) + ".",
            hint=f"fit heads on this model with `kedro run --pipeline={arch}_features`, or "
                 "predict with the model version the head was fitted on")


def head_probabilities(estimator: Any, features: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities with one column per class index 0..k-1 (a class the head never saw: 0)."""
    prob = np.asarray(estimator.predict_proba(features), dtype=np.float64)
    seen = np.asarray(estimator.classes_, dtype=int)
    if len(seen) == n_classes and (seen == np.arange(n_classes)).all():
        return prob
    out = np.zeros((len(features), n_classes))
    out[:, seen] = prob
    return out


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

    family = "feature_heads"  # its entry in models/families.py (what prediction may do with it)

    def __init__(self, model: Any, bundle: Mapping[str, Any], heads_source: str = ""):
        self.backbone, _ = families.features_and_head(model)
        check_head_extractor(bundle, extractor_identity(model, self.feature_dim))
        self.model = model
        self.bundle = dict(bundle)
        self.head = bundle["model"]
        self.classes = [str(c) for c in bundle["classes"]]
        # The head's probabilities are its own: the network's temperature does not apply.
        self.preprocessing = preprocessing_of(model).with_temperature(None)
        self.input_shape = tuple(model.input_shape)
        self.output_shape = (None, len(self.classes))
        self.name = f"{model.name}+{bundle['name']}"
        where = f" ({heads_source})" if heads_source else ""
        self.model_source = (f"{getattr(model, 'model_source', None) or model.name} + head "
                             f"{bundle['name']}{where}")

    @property
    def feature_dim(self) -> int:
        return int(self.backbone.output_shape[-1])

    def features(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.backbone.predict_on_batch(batch), dtype=np.float32)

    def predict_on_batch(self, batch: np.ndarray) -> np.ndarray:
        return head_probabilities(self.head, self.features(batch), len(self.classes))
