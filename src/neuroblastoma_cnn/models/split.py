"""Splitting a built classifier at its pooled features: one function for every architecture."""

from __future__ import annotations

import keras


def split_at_features(
    model: keras.Model, builder: str, features: str, dropout: str, dense: str
) -> tuple[keras.Model, keras.Model]:
    """(image -> pooled features, features -> probabilities) sharing ``model``'s layers and
    weights, so the feature heads and ResNet50's cached-feature training see the same network."""
    names = {layer.name for layer in model.layers}
    missing = {features, dropout, dense} - names
    if missing:
        raise ValueError(
            f"Model '{model.name}' was not built by {builder}: no layer(s) {sorted(missing)}."
        )
    pooled = model.get_layer(features).output
    backbone = keras.Model(model.inputs, pooled, name=f"{model.name}_features")
    head_input = keras.Input(shape=tuple(pooled.shape[1:]), name="features")
    x = model.get_layer(dropout)(head_input)
    head = keras.Model(head_input, model.get_layer(dense)(x), name=f"{model.name}_head")
    return backbone, head
