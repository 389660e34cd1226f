"""A CNN as feature extractor, a scikit-learn head as classifier: identity and application.

The features pipeline fits heads on a model's pooled penultimate features; prediction applies
extractor + head to new images. Both live here (not in a pipeline) because both need them.

A head is only valid on the features of the exact network it was fitted on, so every head
carries the extractor's *identity* (:func:`extractor_identity`); the checks on it live with the
heads' storage format (``datasets/sklearn_heads.py``), which needs no TensorFlow.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from neuroblastoma_cnn.core.errors import ModelError
from neuroblastoma_cnn.datasets.sklearn_heads import (
    HEADS_FILE,
    check_head_extractor,
    head_probabilities,
    load_heads,
    sha256_json,
    weights_sha256,
)
from neuroblastoma_cnn.images.preprocessing import preprocessing_of

from . import features_and_head

logger = logging.getLogger(__name__)


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
        self.backbone, _ = features_and_head(model)
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


def find_head(models_dir: str | Path, model: Any, head: str) -> tuple[dict[str, Any], Path]:
    """The newest saved head ``head`` fitted on ``model``'s own features, and its file.

    Heads live in ``<models_dir>/<architecture>/heads.pkl/<version>/heads.pkl`` (the features
    pipelines' catalog entry). Versions are searched newest first and the first whose extractor
    identity matches the model wins, so predicting with an older model version finds the heads
    fitted on it. Errors say what exists and what to run.
    """
    backbone, _ = features_and_head(model)
    identity = extractor_identity(model, int(backbone.output_shape[-1]))
    arch = identity["architecture"]
    folder = Path(models_dir) / str(arch) / HEADS_FILE
    versions = sorted(p for p in folder.iterdir() if (p / HEADS_FILE).is_file()) if (
        folder.is_dir()) else []
    if not versions:
        raise ModelError(f"No scikit-learn heads fitted on {arch} features in '{folder}'.",
                         hint=f"fit them with `kedro run --pipeline={arch}_features`")
    names: set[str] = set()
    refused: list[str] = []
    for version in reversed(versions):
        path = version / HEADS_FILE
        bundles = load_heads(path)
        names |= set(bundles)
        if head not in bundles:
            continue
        try:
            check_head_extractor(bundles[head], identity)
        except ModelError as exc:
            refused.append(f"{version.name}: {exc}")
            continue
        logger.info("Head %s from %s (fitted on %s)", head, path,
                    bundles[head]["extractor"].get("source"))
        return bundles[head], path
    if not refused:
        raise ModelError(f"No head '{head}' in '{folder}'; saved heads: "
                         f"{', '.join(sorted(names))}.",
                         hint="name one of them (predict.head / --head)")
    raise ModelError(
        f"Head '{head}' exists in {len(refused)} version(s) of '{folder}' but none was fitted on "
        f"the features of model '{identity['source']}'. Newest: {refused[0]}",
        hint=f"fit heads on this model with `kedro run --pipeline={arch}_features`")


def head_classifier(models_dir: str | Path, model: Any, head: str) -> HeadClassifier:
    """Extractor ``model`` + its head ``head``, ready for prediction (see :func:`find_head`)."""
    bundle, path = find_head(models_dir, model, head)
    return HeadClassifier(model, bundle, heads_source=str(path))
