"""Which training tiles each epoch draws: class-balanced or plain shuffled, seeded, endless.

Balancing by fixed augmented copies (the study's 600 per class) shows the network the same few
minority images again and again in the same form; balancing by *sampling* draws every class
equally often and, with online augmentation, each draw is a new variant. Both streams are
endless (``repeat``) and an epoch is a fixed number of steps (:func:`steps_per_epoch`), so
Keras keeps one iterator across epochs and the online augmentation's batch counter keeps
counting.

The streams yield *positions* into the training arrays; the caller gathers the pixels (from
memory or a tile store), which keeps sampling independent of where tiles live.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from neuroblastoma_cnn.core.errors import DataError, ParameterError

SAMPLINGS = ("balanced", "shuffle")

def _tf() -> Any:
    """TensorFlow, imported on first use: pipelines import this module when they are
    registered, and a command that trains nothing should not load TensorFlow."""
    import tensorflow as tf  # noqa: PLC0415  (lazy, see above)

    return tf



def steps_per_epoch(n_samples: int, batch_size: int, steps: int | None = None) -> int:
    """``steps`` when given, else as many batches as one pass over the training set takes."""
    if steps is not None:
        if int(steps) < 1:
            raise ParameterError(f"steps_per_epoch must be >= 1 or null, got {steps}.")
        return int(steps)
    if n_samples < 1 or batch_size < 1:
        raise ParameterError(f"Need samples and batch size >= 1, got {n_samples}, {batch_size}.")
    return math.ceil(n_samples / batch_size)


def index_stream(labels: np.ndarray, sampling: str, seed: int) -> Any:
    """An endless ``tf.data.Dataset`` of int64 positions into ``labels`` (one per sample).

    ``shuffle``: every position once per pass, reshuffled each pass. ``balanced``: each class
    drawn with probability 1/k per sample (each class's positions cycle in reshuffled order), so
    rare classes are seen as often as common ones and common ones are not cut.
    """
    tf = _tf()

    if sampling not in SAMPLINGS:
        raise ParameterError(f"sampling must be one of {SAMPLINGS}, got '{sampling}'.")
    y = np.asarray(labels, dtype=np.int64)
    if y.size == 0:
        raise DataError("No training samples to draw from.")
    if sampling == "shuffle":
        positions = np.arange(len(y), dtype=np.int64)
        return (tf.data.Dataset.from_tensor_slices(positions)
                .shuffle(len(y), seed=seed, reshuffle_each_iteration=True).repeat())
    classes = np.unique(y)
    streams = [
        tf.data.Dataset.from_tensor_slices(np.flatnonzero(y == c).astype(np.int64))
        .shuffle(int((y == c).sum()), seed=seed + 1 + i, reshuffle_each_iteration=True)
        .repeat()
        for i, c in enumerate(classes)
    ]
    if len(streams) == 1:
        return streams[0]
    weights = [1.0 / len(streams)] * len(streams)
    return tf.data.Dataset.sample_from_datasets(streams, weights=weights, seed=seed)


def batched_training_data(
    source: Any,
    labels: np.ndarray,
    *,
    batch_size: int,
    sampling: str,
    seed: int,
    tile_shape: tuple[int, ...] | None = None,
) -> Any:
    """Endless batches ``(float32 images, int64 labels)`` drawn by :func:`index_stream`.

    ``source`` is a uint8 array ``[n, H, W, 3]`` held in memory, or a function
    ``gather(positions) -> uint8 array`` (e.g. reading a tile store) with ``tile_shape``.
    """
    tf = _tf()

    y = np.asarray(labels, dtype=np.int64)
    positions = index_stream(y, sampling, seed).batch(batch_size)
    y_tensor = tf.constant(y)
    if callable(source):
        if tile_shape is None:
            raise ParameterError("batched_training_data: a gather function needs tile_shape.")
        shape = tuple(tile_shape)

        def load(ids: Any) -> tuple[Any, Any]:
            images = tf.numpy_function(lambda i: np.asarray(source(i), np.uint8), [ids],
                                       tf.uint8)
            images.set_shape((None, *shape))
            return tf.cast(images, tf.float32), tf.gather(y_tensor, ids)
    else:
        array = np.asarray(source)
        if array.dtype != np.uint8 or len(array) != len(y):
            raise DataError(
                f"batched_training_data: expected {len(y)} uint8 images, got {len(array)} "
                f"of {array.dtype}."
            )
        images_tensor = tf.constant(array)

        def load(ids: Any) -> tuple[Any, Any]:
            return tf.cast(tf.gather(images_tensor, ids), tf.float32), tf.gather(y_tensor, ids)

    return positions.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
