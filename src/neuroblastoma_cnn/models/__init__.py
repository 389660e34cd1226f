"""Model builders: one function per architecture, chosen by name from the parameters."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import keras

from neuroblastoma_cnn.core.errors import ModelError, ParameterError

from . import resnet34, resnet50
from .ensemble import (  # importing it registers WeightedMean: every loader imports models
    build_ensemble,
    check_members,
    ensemble_members,
    is_ensemble,
)
from .resnet34 import build_resnet34
from .resnet50 import (
    WeightsUnavailableError,
    backbone_and_head,
    build_resnet50,
    set_trainable_top_blocks,
)

ARCHITECTURES: dict[str, Callable[..., keras.Model]] = {
    "resnet34": build_resnet34,
    "resnet50": build_resnet50,
}

__all__ = [
    "ARCHITECTURES",
    "WeightsUnavailableError",
    "backbone_and_head",
    "build_ensemble",
    "build_model",
    "build_resnet34",
    "build_resnet50",
    "check_members",
    "ensemble_members",
    "features_and_head",
    "is_ensemble",
    "set_trainable_top_blocks",
]


def build_model(architecture: str, input_size: int, num_classes: int, **params: Any) -> keras.Model:
    """Builds ``architecture`` ("resnet34" or "resnet50") with its parameters from the config.

    Unknown names or parameters fail with a message listing what is accepted, instead of a
    TypeError deep inside Keras.
    """
    name = str(architecture).strip().lower()
    if name not in ARCHITECTURES:
        raise ModelError(
            f"Unknown architecture '{architecture}'. Known architectures: "
            f"{', '.join(sorted(ARCHITECTURES))}."
        )
    builder = ARCHITECTURES[name]
    accepted = [p for p in inspect.signature(builder).parameters if p not in
                ("input_size", "num_classes")]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ParameterError(
            f"Unknown parameter(s) {unknown} for architecture '{name}'. "
            f"Accepted: {', '.join(accepted)}."
        )
    return builder(input_size=input_size, num_classes=num_classes, **params)


def features_and_head(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """(image -> pooled penultimate features, features -> probabilities) of either ResNet built
    here, sharing its layers: ResNet50's ``head_pool`` or ResNet34's ``avg_pool`` features
    (the scikit-learn heads' input)."""
    names = {layer.name for layer in model.layers}
    if resnet50.HEAD.features in names:
        return resnet50.backbone_and_head(model)
    if resnet34.HEAD.features in names:
        return resnet34.backbone_and_head(model)
    raise ModelError(
        f"Model '{model.name}' has no pooled-feature layer ('{resnet50.HEAD.features}' or "
        f"'{resnet34.HEAD.features}'): it was not built by this project's ResNet builders."
    )
