"""The fused BatchNormalization computes Keras 3's BatchNormalization: forward, gradients and
moving statistics, in float32 and under mixed bfloat16, and saves as it loads."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from neuroblastoma_cnn.models.batch_norm import FusedBatchNormalization
from neuroblastoma_cnn.models.resnet34 import build_resnet34


def _pair(dtype: str) -> tuple[keras.layers.Layer, keras.layers.Layer]:
    """A Keras and a fused layer with the same (non-trivial) weights."""
    layers = []
    for cls in (keras.layers.BatchNormalization, FusedBatchNormalization):
        layer = cls(momentum=0.9, epsilon=1e-3, dtype=dtype)
        layer.build((8, 5, 5, 6))
        layers.append(layer)
    rng = np.random.default_rng(0)
    weights = [rng.normal(1, 0.3, 6), rng.normal(0, 0.3, 6), rng.normal(0, 1, 6),
               rng.uniform(0.5, 2, 6)]
    for layer in layers:
        layer.set_weights([w.astype("float32") for w in weights])
    return layers[0], layers[1]


@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-5), ("mixed_bfloat16", 3e-2)])
def test_fused_training_step_is_keras_maths(dtype: str, tol: float) -> None:
    reference, fused = _pair(dtype)
    x = tf.constant(np.random.default_rng(1).normal(2, 3, (8, 5, 5, 6)), tf.float32)
    upstream = tf.constant(np.random.default_rng(2).normal(0, 1, (8, 5, 5, 6)), tf.float32)
    results = []
    for layer in (reference, fused):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        results.append([y, *grads, layer.moving_mean, layer.moving_variance])
    for ours, theirs in zip(results[1], results[0], strict=True):
        assert ours.dtype == theirs.dtype
        np.testing.assert_allclose(np.asarray(tf.cast(ours, tf.float32)),
                                   np.asarray(tf.cast(theirs, tf.float32)), rtol=tol, atol=tol)
    # Inference uses the moving statistics, as Keras does.
    np.testing.assert_allclose(fused(x, training=False), reference(x, training=False),
                               rtol=tol, atol=tol)


def test_fused_layer_falls_back_where_the_kernel_does_not_apply() -> None:
    layer = FusedBatchNormalization(axis=1)  # channels first: Keras' own code
    y = layer(tf.ones((2, 3, 4, 4)), training=True)
    assert y.shape == (2, 3, 4, 4)
    dense = FusedBatchNormalization()  # 2-D input: Keras' own code
    assert dense(tf.ones((4, 3)), training=True).shape == (4, 3)


def test_a_fused_resnet_saves_and_loads_and_predicts_as_the_keras_one(tmp_path) -> None:
    kwargs = dict(input_size=32, num_classes=3, seed=0, stages=[[8, 1], [16, 1]])
    fused = build_resnet34(**kwargs, batch_norm="fused")
    plain = build_resnet34(**kwargs, batch_norm="keras")
    assert {type(layer).__name__ for layer in fused.layers if "bn" in layer.name} == {
        "FusedBatchNormalization"}
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    fused.save(tmp_path / "fused.keras")
    loaded = keras.models.load_model(tmp_path / "fused.keras")
    plain.set_weights(loaded.get_weights())  # the same weights in either layer
    np.testing.assert_allclose(loaded.predict(x, verbose=0), plain.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="batch_norm must be one of fused, keras"):
        build_resnet34(**kwargs, batch_norm="cudnn")
