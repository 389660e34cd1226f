"""Test-time augmentation averages a model's probabilities over the exact symmetries."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from neuroblastoma_cnn.analysis.tta import tta_probabilities
from neuroblastoma_cnn.images import online_augmentation as oa


def test_tta_averages_the_model_over_the_eight_symmetries():
    # A model that sees orientation: the mean of the top-left quarter decides the output.
    inputs = keras.Input((8, 8, 3))
    corner = keras.layers.Lambda(lambda x: tf.reduce_mean(x[:, :4, :4, :], axis=[1, 2, 3]))(inputs)
    logits = keras.layers.Lambda(lambda c: tf.stack([c, 255.0 - c], axis=1) / 50.0)(corner)
    model = keras.Model(inputs, keras.layers.Softmax()(logits))
    images = np.zeros((3, 8, 8, 3), np.float32)
    images[:, :4, :4] = 255.0  # bright top-left quarter only
    ds = tf.data.Dataset.from_tensor_slices((images, np.arange(3))).batch(2)
    plain = model.predict(ds, verbose=0)
    tta = tta_probabilities(model, ds)
    expected = np.mean([model.predict(oa.dihedral_numpy(images, k), verbose=0)
                        for k in range(8)], axis=0)
    assert plain[0, 0] > 0.99  # the plain view is certain
    assert np.allclose(tta, expected, atol=1e-5)
    assert 0.2 < tta[0, 0] < 0.3  # only 2 of 8 symmetries keep the bright corner top-left
