"""ResNet34 trained from scratch, as in He et al. 2016 ("Deep Residual Learning", Table 1).

The model takes raw tiles (uint8 values cast to float, range [0, 255]) and rescales them itself,
so the preprocessing is saved with the model and serving cannot feed it differently scaled input.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator, Sequence

import keras
from keras import layers

from neuroblastoma_cnn.models.batch_norm import FusedBatchNormalization
from neuroblastoma_cnn.models.head import HeadLayers, classifier_head, split_at_features

# (filters, blocks) of the four stages conv2_x .. conv5_x in Table 1 of He et al. 2016: what
# `resnet34.model.stages` holds in conf/base. Fewer, narrower stages (the `tiny` environment's
# two blocks of 16 and 32 filters) keep the code path and make tests about plumbing fast.
STAGES: tuple[tuple[int, int], ...] = ((64, 3), (128, 4), (256, 6), (512, 3))
BN_EPSILON = 1.001e-5  # as keras.applications' ResNets
#: ``batch_norm`` -> the layer: the same maths, one fused kernel or Keras' separate ops.
BATCH_NORM = {"fused": FusedBatchNormalization, "keras": layers.BatchNormalization}
#: The head's layers (pooled features, dropout, classifier), as keras.applications names them.
HEAD = HeadLayers(features="avg_pool", dropout="dropout", dense="predictions")


class _Init:
    """Fresh initializers with distinct, reproducible seeds.

    Keras initializers seeded with the same int repeat the same values, so every layer gets its
    own seed drawn from a counter: the whole network is reproducible from one ``seed``.
    """

    def __init__(self, seed: int | None) -> None:
        self._seeds: Iterator[int] | None = None if seed is None else itertools.count(seed * 1009)

    def _next(self) -> int | None:
        return None if self._seeds is None else next(self._seeds)

    def he(self) -> keras.initializers.Initializer:
        return keras.initializers.HeNormal(seed=self._next())

    def glorot(self) -> keras.initializers.Initializer:
        return keras.initializers.GlorotUniform(seed=self._next())


def _regularizer(l1: float, l2: float) -> keras.regularizers.Regularizer | None:
    if l1 < 0 or l2 < 0:
        raise ValueError(f"l1 and l2 must be >= 0, got l1={l1}, l2={l2}.")
    return keras.regularizers.L1L2(l1=l1, l2=l2) if (l1 > 0 or l2 > 0) else None


def _conv_bn(
    x: keras.KerasTensor,
    *,
    filters: int,
    kernel: int,
    stride: int,
    name: str,
    bn_name: str,
    init: _Init,
    reg: keras.regularizers.Regularizer | None,
    norm: Callable[..., layers.Layer],
) -> keras.KerasTensor:
    # No conv bias: the following BatchNormalization's beta plays that role (as in the paper).
    x = layers.Conv2D(
        filters, kernel, strides=stride, padding="same", use_bias=False,
        kernel_initializer=init.he(), kernel_regularizer=reg, name=name,
    )(x)
    return norm(name=bn_name)(x)


def _basic_block(
    x: keras.KerasTensor,
    *,
    filters: int,
    stride: int,
    name: str,
    init: _Init,
    reg: keras.regularizers.Regularizer | None,
    norm: Callable[..., layers.Layer],
) -> keras.KerasTensor:
    """Two 3x3 conv-BN layers plus the shortcut; ReLU after the addition."""
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        # Projection shortcut (option B of the paper) where the shape changes.
        shortcut = _conv_bn(x, filters=filters, kernel=1, stride=stride,
                            name=f"{name}_proj_conv", bn_name=f"{name}_proj_bn", init=init,
                            reg=reg, norm=norm)
    y = _conv_bn(x, filters=filters, kernel=3, stride=stride, name=f"{name}_conv1",
                 bn_name=f"{name}_bn1", init=init, reg=reg, norm=norm)
    y = layers.Activation("relu", name=f"{name}_relu1")(y)
    y = _conv_bn(y, filters=filters, kernel=3, stride=1, name=f"{name}_conv2",
                 bn_name=f"{name}_bn2", init=init, reg=reg, norm=norm)
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.Activation("relu", name=f"{name}_out")(y)


def build_resnet34(
    input_size: int,
    num_classes: int,
    dropout: float = 0.0,
    l1: float = 0.0,
    l2: float = 0.0,
    seed: int | None = None,
    batch_norm_momentum: float = 0.99,
    stages: Sequence[Sequence[int]] = STAGES,
    batch_norm: str = "keras",
) -> keras.Model:
    """Builds an uncompiled ResNet34 for ``input_size`` x ``input_size`` RGB tiles in [0, 255].

    Layers are named ``conv1_conv``, ``pool1_pool``, ``conv<stage>_block<i>_conv<j>`` /
    ``_bn<j>`` / ``_proj_conv`` / ``_proj_bn``, ``avg_pool``, ``dropout``, ``predictions``.
    L1/L2 penalties (when > 0) apply to every conv and dense kernel; ``seed`` makes the
    initial weights and the dropout mask sequence reproducible. ``batch_norm_momentum`` is the
    weight of the old value in BatchNormalization's moving statistics (Keras' default 0.99;
    PyTorch's is 0.9): with a few hundred steps an epoch, 0.99 lags the weights and the
    validation predictions swing between epochs. ``stages`` lists (filters, blocks) per stage
    (the paper's four by default); the stem has the first stage's width. ``batch_norm``
    ("keras" or "fused", the project's setting) picks BatchNormalization's implementation, same
    maths (:mod:`~neuroblastoma_cnn.models.batch_norm`).
    """
    stages = [(int(filters), int(blocks)) for filters, blocks in stages]
    if not stages or any(f < 1 or b < 1 for f, b in stages):
        raise ValueError(f"stages must be (filters, blocks) pairs of positive ints, got {stages}.")
    smallest = 2 ** (len(stages) + 1)  # the stem halves twice, each later stage once
    if input_size < smallest:
        raise ValueError(f"This ResNet needs input_size >= {smallest} ({len(stages) + 1} "
                         f"stride-2 steps), got {input_size}.")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
    if not 0.0 < batch_norm_momentum < 1.0:
        raise ValueError(f"batch_norm_momentum must be in (0, 1), got {batch_norm_momentum}.")
    if batch_norm not in BATCH_NORM:
        raise ValueError(f"batch_norm must be one of {', '.join(BATCH_NORM)}, got {batch_norm!r}.")
    reg = _regularizer(l1, l2)
    init = _Init(seed)
    norm = functools.partial(BATCH_NORM[batch_norm], momentum=batch_norm_momentum,
                             epsilon=BN_EPSILON)

    inputs = keras.Input(shape=(input_size, input_size, 3), name="image")
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    x = _stem(x, filters=stages[0][0], init=init, reg=reg, norm=norm)
    for stage, (filters, blocks) in enumerate(stages, start=2):
        for block in range(1, blocks + 1):
            stride = 2 if (block == 1 and stage > 2) else 1
            x = _basic_block(x, filters=filters, stride=stride, name=f"conv{stage}_block{block}",
                             init=init, reg=reg, norm=norm)

    outputs = classifier_head(x, num_classes, dropout, seed, HEAD, init.glorot(), reg)
    return keras.Model(inputs, outputs, name="resnet34")


def _stem(x: keras.KerasTensor, filters: int, init: _Init,
          reg: keras.regularizers.Regularizer | None,
          norm: Callable[..., layers.Layer]) -> keras.KerasTensor:
    """The stem: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool (explicit padding as in the paper)."""
    x = layers.ZeroPadding2D(3, name="conv1_pad")(x)
    x = layers.Conv2D(filters, 7, strides=2, use_bias=False, kernel_initializer=init.he(),
                      kernel_regularizer=reg, name="conv1_conv")(x)
    x = norm(name="conv1_bn")(x)
    x = layers.Activation("relu", name="conv1_relu")(x)
    x = layers.ZeroPadding2D(1, name="pool1_pad")(x)
    return layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)


def backbone_and_head(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """Splits a ``build_resnet34`` model into (image -> pooled features, features -> probabilities),
    as ``resnet50.backbone_and_head`` does for ResNet50: the features of scikit-learn heads.

    Both share their layers, hence their weights, with ``model``.
    """
    return split_at_features(model, "build_resnet34", HEAD)
