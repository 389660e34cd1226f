"""The classifier head both ResNets end with, and the split of a built model at its features.

Head: pooled penultimate features (``GlobalAveragePooling2D``) -> dropout -> softmax classifier.
The layer names differ by architecture (saved models carry them), so each builder passes its own
:class:`HeadLayers`; the scikit-learn heads' features and ResNet50's cached-feature training
split a model at those same names.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import keras
from keras import layers


class HeadLayers(NamedTuple):
    """The names of a classifier's head layers: pooled features, dropout, classifier."""

    features: str
    dropout: str
    dense: str


def classifier_head(x: keras.KerasTensor, num_classes: int, dropout: float, seed: int | None,
                    names: HeadLayers, initializer: Any, regularizer: Any) -> keras.KerasTensor:
    """Pooled features -> dropout (seeded) -> softmax over ``num_classes``."""
    x = layers.GlobalAveragePooling2D(name=names.features)(x)
    x = layers.Dropout(dropout, seed=seed, name=names.dropout)(x)
    return layers.Dense(num_classes, activation="softmax", kernel_initializer=initializer,
                        kernel_regularizer=regularizer, name=names.dense)(x)


def split_at_features(model: keras.Model, builder: str, names: HeadLayers
                      ) -> tuple[keras.Model, keras.Model]:
    """(image -> pooled features, features -> probabilities) sharing ``model``'s layers and
    weights, so the feature heads and ResNet50's cached-feature training see the same network."""
    present = {layer.name for layer in model.layers}
    missing = set(names) - present
    if missing:
        raise ValueError(
            f"Model '{model.name}' was not built by {builder}: no layer(s) {sorted(missing)}."
        )
    pooled = model.get_layer(names.features).output
    backbone = keras.Model(model.inputs, pooled, name=f"{model.name}_features")
    head_input = keras.Input(shape=tuple(pooled.shape[1:]), name="features")
    x = model.get_layer(names.dropout)(head_input)
    head = keras.Model(head_input, model.get_layer(names.dense)(x), name=f"{model.name}_head")
    return backbone, head
