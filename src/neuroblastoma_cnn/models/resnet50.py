"""ResNet50 transfer learning: ImageNet backbone, new head, two-stage training.

Layout of the built model (names matter: the helpers below find layers by name)::

    image (s, s, 3) float in [0, 255]
      -> imagenet_preprocess   (Caffe-style: RGB->BGR, minus the ImageNet means; no weights)
      -> resnet50              (nested keras.applications.ResNet50, include_top=False, always
                                called with training=False: BatchNorm stays in inference mode)
      -> head_pool             (GlobalAveragePooling2D -> 2048 features)
      -> head_dropout -> head_dense (softmax)

Stage 1 trains only the head. Because the frozen backbone gives the same features for an image at
every epoch (augmentation happens before, in the data pipeline), ``cache_features`` runs the
backbone once per image, and the head trains on the cached features. Stage 2
(``set_trainable_top_blocks``) unfreezes the top residual blocks for fine-tuning.

Loading a saved model (``keras.models.load_model``) needs ``neuroblastoma_cnn.models`` imported
first, which registers the ``ImagenetPreprocess`` layer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from neuroblastoma_cnn.core.errors import ModelError
from neuroblastoma_cnn.models.head import HeadLayers, classifier_head, split_at_features

logger = logging.getLogger(__name__)

BACKBONE_NAME = "resnet50"
HEAD = HeadLayers(features="head_pool", dropout="head_dropout", dense="head_dense")

IMAGENET_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_URL = f"https://storage.googleapis.com/tensorflow/keras-applications/resnet/{IMAGENET_FILE}"
IMAGENET_MD5 = "4d473c1dd8becc155b73f8504c6f6626"  # keras.applications' hash for this file

# keras.applications.resnet50.preprocess_input ("caffe" mode) constants, in BGR order.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)

# Residual blocks of keras.applications.ResNet50, from the output side down.
RESNET50_BLOCKS: tuple[str, ...] = tuple(
    f"conv{stage}_block{block}"
    for stage, blocks in ((5, 3), (4, 6), (3, 4), (2, 3))
    for block in range(blocks, 0, -1)
)


class WeightsUnavailableError(ModelError, RuntimeError):
    """The ImageNet weights could not be downloaded (typically: no internet access)."""


@keras.saving.register_keras_serializable(package="neuroblastoma_cnn")
class ImagenetPreprocess(layers.Layer):
    """``keras.applications.resnet50.preprocess_input`` as a layer, so it is saved with the model.

    A weightless layer (not a Lambda) keeps the saved model loadable without ``safe_mode=False``
    and cannot be unfrozen by accident.
    """

    def call(self, inputs: Any) -> Any:
        x = keras.ops.cast(inputs, self.compute_dtype)
        x = keras.ops.flip(x, axis=-1)  # RGB -> BGR
        return x - keras.ops.convert_to_tensor(CAFFE_BGR_MEAN, dtype=self.compute_dtype)

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> Sequence[int | None]:
        return input_shape


@contextlib.contextmanager
def _seeded_default_initializers(seed: int | None) -> Iterator[None]:
    """Makes keras.applications' unseeded initializers reproducible, without global side effects.

    Keras draws the seed of an unseeded initializer from Python's ``random`` module; seeding it
    for the duration of the build (and restoring its state after) fixes the random backbone.
    """
    if seed is None:
        yield
        return
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def _keras_cache_file() -> Path:
    home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    return Path(home) / "models" / IMAGENET_FILE


def _imagenet_weights_file() -> str:
    """Path of the cached ImageNet file, downloading it when absent; clear error when offline."""
    try:
        return keras.utils.get_file(
            IMAGENET_FILE, IMAGENET_URL, cache_subdir="models", file_hash=IMAGENET_MD5
        )
    except Exception as error:  # get_file raises a bare Exception on URLError / HTTPError
        raise WeightsUnavailableError(
            f"Could not download the ImageNet ResNet50 weights from {IMAGENET_URL} "
            f"({type(error).__name__}: {error}). This machine may have no internet access. "
            f"Download '{IMAGENET_FILE}' elsewhere, then either put it in Keras' cache at "
            f"'{_keras_cache_file()}' (looked up before any download) or point the model "
            f"parameters to it: `weights: /path/to/{IMAGENET_FILE}`. "
            "Use `weights: null` for random initialisation."
        ) from error


def _copy_backbone_weights(source: keras.Model, backbone: keras.Model, path: Path) -> None:
    """Copies weights layer by layer by name (the input size may differ from the saved one)."""
    if isinstance(layer := _find_layer(source, BACKBONE_NAME), keras.Model):
        source = layer  # a model built by build_resnet50: take its backbone
    by_name = {layer.name: layer for layer in source.layers}
    for layer in backbone.layers:
        if not layer.weights:
            continue
        src = by_name.get(layer.name)
        if src is None or [w.shape for w in src.weights] != [w.shape for w in layer.weights]:
            raise ValueError(
                f"'{path}' is not an include_top=False ResNet50: layer '{layer.name}' is "
                "missing or has other weight shapes."
            )
        layer.set_weights(src.get_weights())


def _find_layer(model: keras.Model, name: str) -> keras.layers.Layer | None:
    return next((layer for layer in model.layers if layer.name == name), None)


def _load_local_weights(backbone: keras.Model, weights: str | os.PathLike) -> None:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"ResNet50 weights file '{path}' does not exist. Set `weights` to an existing "
            f"file (e.g. /path/to/{IMAGENET_FILE}), to 'imagenet' to download, or to null."
        )
    try:
        if path.name.endswith(".keras"):
            source = keras.models.load_model(path, compile=False)
            _copy_backbone_weights(source, backbone, path)
        elif path.suffix == ".h5":  # legacy Keras h5 (the ImageNet file) or .weights.h5
            backbone.load_weights(path)
        else:
            raise ValueError("expected a .h5, .weights.h5 or .keras file")
    except Exception as error:
        raise ValueError(
            f"Could not load ResNet50 weights from '{path}': {error}. Expected the weights of "
            "an include_top=False keras.applications.ResNet50 (.h5 / .weights.h5 from "
            "save_weights) or a saved .keras model."
        ) from error
    logger.info("Loaded ResNet50 backbone weights from %s", path)


def build_resnet50(
    input_size: int,
    num_classes: int,
    dropout: float = 0.0,
    l1: float = 0.0,
    l2: float = 0.0,
    weights: str | os.PathLike | None = "imagenet",
    seed: int | None = None,
) -> keras.Model:
    """Builds an uncompiled ResNet50 classifier for raw [0, 255] tiles, backbone frozen.

    ``weights``: "imagenet" (Keras cache, else download), a local weights file, or None (random,
    reproducible given ``seed``).
    L1/L2 (when > 0) go on the head kernel and on every backbone conv kernel; Keras only counts
    the penalty of trainable weights, so backbone kernels are penalised once they are unfrozen.
    """
    if input_size < 32:
        raise ValueError(f"ResNet50 needs input_size >= 32, got {input_size}.")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
    if l1 < 0 or l2 < 0:
        raise ValueError(f"l1 and l2 must be >= 0, got l1={l1}, l2={l2}.")
    reg = keras.regularizers.L1L2(l1=l1, l2=l2) if (l1 > 0 or l2 > 0) else None

    backbone = _frozen_backbone(input_size, weights, seed, reg)

    inputs = keras.Input(shape=(input_size, input_size, 3), name="image")
    x = ImagenetPreprocess(name="imagenet_preprocess")(inputs)
    x = backbone(x, training=False)
    outputs = classifier_head(x, num_classes, dropout, seed, HEAD,
                              keras.initializers.GlorotUniform(seed=seed), reg)
    return keras.Model(inputs, outputs, name="resnet50_transfer")


def _frozen_backbone(input_size: int, weights: str | os.PathLike | None, seed: int | None,
                     reg: Any) -> keras.Model:
    """Keras' ResNet50 without its top, with the chosen weights (random ones seeded), the
    kernel penalty ``reg`` on every conv, and frozen."""
    weights_file = _imagenet_weights_file() if weights == "imagenet" else None
    with _seeded_default_initializers(seed):
        backbone = keras.applications.ResNet50(
            include_top=False, weights=None, input_shape=(input_size, input_size, 3),
            name=BACKBONE_NAME,
        )
    if weights_file is not None:
        _load_local_weights(backbone, weights_file)
    elif weights is not None:
        _load_local_weights(backbone, weights)
    if reg is not None:
        for layer in backbone.layers:
            if isinstance(layer, layers.Conv2D):
                layer.kernel_regularizer = reg  # saved in the layer config
                layer.kernel.regularizer = reg  # used for the loss
    backbone.trainable = False
    return backbone


def backbone_and_head(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """Splits a ``build_resnet50`` model into (image -> pooled features, features -> probabilities).

    Both share their layers, hence their weights, with ``model``: training the head trains
    ``model``'s head.
    """
    return split_at_features(model, "build_resnet50", HEAD)


def set_trainable_top_blocks(model: keras.Model, n_blocks: int) -> list[str]:
    """Stage 2: unfreezes the top ``n_blocks`` residual blocks (conv5_block3, conv5_block2, ...).

    Every BatchNormalization layer stays frozen (and the backbone runs with training=False), so
    small fine-tuning batches cannot corrupt the ImageNet statistics. The head stays trainable.
    Recompile the model afterwards: Keras reads ``trainable`` at compile time.
    Returns the names of the unfrozen layers.
    """
    if not 0 <= n_blocks <= len(RESNET50_BLOCKS):
        raise ValueError(
            f"n_blocks must be between 0 and {len(RESNET50_BLOCKS)} (ResNet50's residual "
            f"blocks), got {n_blocks}."
        )
    backbone = model.get_layer(BACKBONE_NAME)
    top = RESNET50_BLOCKS[:n_blocks]
    backbone.trainable = n_blocks > 0
    unfrozen = []
    for layer in backbone.layers:
        in_top = layer.name.startswith(tuple(f"{block}_" for block in top))
        layer.trainable = in_top and not isinstance(layer, layers.BatchNormalization)
        if layer.trainable and layer.weights:
            unfrozen.append(layer.name)
    logger.info("Fine-tuning %d top ResNet50 blocks: %d layers trainable", n_blocks, len(unfrozen))
    return unfrozen


def _batches(x: Any, y: Any, batch_size: int) -> Any:
    """Yields (images, labels) batches from numpy arrays or a tf.data.Dataset of batches."""
    if hasattr(x, "element_spec"):  # tf.data.Dataset, already batched
        for element in x:
            if not isinstance(element, tuple) or len(element) != 2:
                raise ValueError("A dataset passed as x must yield (images, labels) batches.")
            yield element
        return
    if y is None or len(x) != len(y):
        raise ValueError(
            "With array inputs, x and y must both be given and have the same length "
            f"(got {len(x)} images and {None if y is None else len(y)} labels)."
        )
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]


def extract_features(
    backbone: keras.Model, x: Any, y: Any = None, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Runs the frozen backbone once over every image; returns (features, labels) aligned.

    A dataset is read in a single pass so that features and labels stay aligned even when the
    dataset reshuffles on every iteration.
    """
    features, labels = [], []
    for images, targets in _batches(x, y, batch_size):
        features.append(np.asarray(backbone.predict_on_batch(images), dtype=np.float32))
        labels.append(np.asarray(targets))
    if not features:
        raise ValueError("No images to extract features from (empty input).")
    return np.concatenate(features), np.concatenate(labels)


class CachedFeatures(NamedTuple):
    """Stage-1 inputs: the head model and the backbone features it trains and validates on."""

    head: keras.Model
    train: Any  # tf.data.Dataset of (features, labels) batches, reshuffled each epoch
    val_features: np.ndarray | None
    val_labels: np.ndarray | None


def cache_features(
    model: keras.Model,
    x_train: Any,
    y_train: Any,
    x_val: Any = None,
    y_val: Any = None,
    *,
    batch_size: int,
    seed: int | None = None,
    shuffle: bool = True,
) -> CachedFeatures:
    """Runs the frozen backbone once over the training (and validation) images.

    Equivalent to fitting the whole frozen model on the images (the backbone output of an image
    never changes while frozen), but the backbone runs once per image instead of once per
    image and epoch; the cache holds 2048 float32 per image (8 KiB).
    """
    backbone, head = backbone_and_head(model)
    if backbone.trainable_weights:
        raise ValueError("The backbone must be frozen for cached features to be valid.")
    f_train, l_train = extract_features(backbone, x_train, y_train, batch_size)
    logger.info("Feature cache: %d training images -> %s features", len(f_train), f_train.shape)
    train = tf.data.Dataset.from_tensor_slices((f_train, l_train))
    if shuffle:
        train = train.shuffle(len(f_train), seed=seed, reshuffle_each_iteration=True)
    train = train.batch(batch_size)
    f_val = l_val = None
    if x_val is not None:
        f_val, l_val = extract_features(backbone, x_val, y_val, batch_size)
    return CachedFeatures(head, train, f_val, l_val)
