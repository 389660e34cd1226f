"""BatchNormalization as one fused kernel in training: Keras 3's maths, a fraction of its ops.

Keras 3 normalizes a batch with about a dozen separate ops forward (moments, casts, broadcasts)
and as many backward; on a CPU at 64-128 px these element-wise ops took about a quarter of a
ResNet34 training step (``benchmarks/profile_training_step.py``). TensorFlow's
``FusedBatchNormV3`` (oneDNN on CPU, cuDNN on GPU) computes the same normalization, and its
gradient, in one op each, in bfloat16 or float16 directly where the layer computes in them.

The maths is Keras 3's: the batch's mean and biased variance normalize it, and the moving
statistics are updated with the same momentum from the same biased variance (the fused op
returns the unbiased one, which is scaled back). Inference, masks, renormalization, other axes
and other backends use Keras' own code. The saved config is Keras' BatchNormalization's, so a
model saved with either layer loads with either.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers


@keras.saving.register_keras_serializable(package="neuroblastoma_cnn")
class FusedBatchNormalization(layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` whose training step is TensorFlow's fused kernel."""

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        if not (training and self.trainable) or not self._fusable(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf  # noqa: PLC0415  (only on the TensorFlow backend)

        x = inputs if inputs.dtype in (tf.float32, tf.bfloat16, tf.float16) \
            else tf.cast(inputs, tf.float32)
        y, mean, unbiased = tf.compat.v1.nn.fused_batch_norm(
            x, tf.cast(self.gamma, tf.float32), tf.cast(self.beta, tf.float32),
            epsilon=self.epsilon, is_training=True)
        count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
        variance = unbiased * (count - 1.0) / count  # Keras 3 keeps the biased variance
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum
                                    + variance * (1.0 - self.momentum))
        return tf.cast(y, self.compute_dtype)

    def _fusable(self, inputs: Any, mask: Any) -> bool:
        """The fused kernel's case: TensorFlow, NHWC with the channel last, gamma and beta,
        no mask and no renormalization."""
        return (keras.backend.backend() == "tensorflow" and mask is None and not self.renorm
                and self.scale and self.center and len(inputs.shape) == 4
                and self.axis in (-1, 3))
