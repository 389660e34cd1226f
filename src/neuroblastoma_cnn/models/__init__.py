"""Model builders: one function per architecture, chosen by name from the parameters."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import keras

from neuroblastoma_cnn.errors import ModelError, ParameterError

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
    "build_model",
    "build_resnet34",
    "build_resnet50",
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
