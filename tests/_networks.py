"""Small stand-in networks for tests that train: the project's ``build=`` hook takes them in
place of a ResNet, so a training run takes seconds."""

from __future__ import annotations

import keras


def small_cnn(architecture: str, input_size: int, num_classes: int, seed: int | None = None,
              **_: object) -> keras.Model:
    """One convolution, global pooling and a softmax: learns tiles that differ in colour."""
    inputs = keras.Input((input_size, input_size, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, kernel_initializer=keras.initializers.GlorotUniform(seed))(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax",
                                 kernel_initializer=keras.initializers.GlorotUniform(seed))(x)
    return keras.Model(inputs, outputs, name=architecture)
