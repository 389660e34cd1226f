"""tf.data input from tile stores: what training and evaluation feed their models.

One function builds every input pipeline so that training, validation and test tiles reach a
model the same way (uint8 tiles cast to float32 in [0, 255]; each model scales its own input).
TensorFlow is imported inside :func:`make_tf_dataset` only: the pipelines import this module when
they are registered, and a ``kedro`` command that trains nothing should not load TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from neuroblastoma_cnn.core.errors import DataError

#: A per-batch transform for training input: float32 images [n, H, W, 3] in, same shape out.
BatchAugment = Callable[[Any], Any]


def class_names(store: Any) -> list[str]:
    """Class names in label order: the order stored with the tiles, taken from folder names."""
    classes = store.metadata.get("classes")
    if not classes:
        classes = sorted(store.index["label"].astype(str).unique())
    return [str(c) for c in classes]


def encode_labels(labels: pd.Series, classes: list[str]) -> np.ndarray:
    """Maps class names to integer labels; an unknown name is an error, never a silent -1."""
    lookup = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(labels.astype(str)) - set(lookup))
    if unknown:
        raise DataError(f"Labels {unknown} are not among the known classes {classes}.")
    return labels.astype(str).map(lookup).to_numpy(dtype=np.int64)


def split_tile_ids(split_table: pd.DataFrame, split: str) -> list[int]:
    """Tile ids of one split, in table order."""
    ids = split_table.loc[split_table["split"] == split, "tile_id"]
    return [int(i) for i in ids]


def make_tf_dataset(
    store: Any,
    tile_ids: list[int],
    labels: np.ndarray | None,
    batch_size: int,
    *,
    in_memory_limit_mb: float,
    shuffle: bool = False,
    seed: int | None = None,
    augment: BatchAugment | None = None,
) -> Any:
    """A batched, prefetched ``tf.data.Dataset`` of (float32 images, int labels).

    When the subset fits under ``in_memory_limit_mb`` its tiles are read once into memory;
    otherwise batches are gathered from the memory-mapped shards in parallel map calls, so
    memory stays bounded by a few batches whatever the data size. ``augment`` (training input
    only) is applied to each float32 batch after shuffling, in order, so that a seeded
    transform stays repeatable.
    """
    import tensorflow as tf  # noqa: PLC0415  (lazy: see the module docstring)

    n = len(tile_ids)
    y = np.zeros(n, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    tile_bytes = int(np.prod(store.tile_shape))
    if n * tile_bytes <= in_memory_limit_mb * 2**20:
        ds = _in_memory_batches(store, tile_ids, y, batch_size, shuffle=shuffle, seed=seed)
    else:
        ds = _streamed_batches(store, tile_ids, y, batch_size, shuffle=shuffle, seed=seed)
    if augment is not None:
        ds = ds.map(lambda x, t: (augment(x), t), num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def _in_memory_batches(
    store: Any, tile_ids: list[int], y: np.ndarray, batch_size: int, *, shuffle: bool,
    seed: int | None,
) -> Any:
    """Batches of a subset read into memory once: its tiles are part of the dataset."""
    import tensorflow as tf  # noqa: PLC0415  (lazy: see the module docstring)

    ds = tf.data.Dataset.from_tensor_slices((store.get(tile_ids), y))
    if shuffle:
        ds = ds.shuffle(len(tile_ids), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).map(
        lambda x, t: (tf.cast(x, tf.float32), t), num_parallel_calls=tf.data.AUTOTUNE
    )


def _streamed_batches(
    store: Any, tile_ids: list[int], y: np.ndarray, batch_size: int, *, shuffle: bool,
    seed: int | None,
) -> Any:
    """Batches gathered from the memory-mapped shards: the dataset holds tile ids, and each
    batch's tiles are read in a parallel map call (in order)."""
    import tensorflow as tf  # noqa: PLC0415  (lazy: see the module docstring)

    ids = np.asarray(tile_ids, dtype=np.int64)
    shape = store.tile_shape

    def gather(batch_ids: np.ndarray) -> np.ndarray:
        return store.get(batch_ids.tolist())

    def load(batch_ids: Any, batch_y: Any) -> tuple[Any, Any]:
        images = tf.numpy_function(gather, [batch_ids], tf.uint8)
        images.set_shape((None, *shape))
        return tf.cast(images, tf.float32), batch_y

    ds = tf.data.Dataset.from_tensor_slices((ids, y))
    if shuffle:
        ds = ds.shuffle(len(tile_ids), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).map(load, num_parallel_calls=tf.data.AUTOTUNE,
                                    deterministic=True)
