"""Training inputs: the tiles a run trains and validates on, and the batch streams fed to Keras.

Kept apart from ``nodes.py``: how batches are drawn, gathered, augmented and resumed at an epoch
is one concern (see the ``nodes`` module docstring for the two ways to feed the tiles), and the
streams are tested on their own. TensorFlow is imported inside the functions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from neuroblastoma_cnn.core.errors import DataError, ParameterError
from neuroblastoma_cnn.datasets.tile_store import TileStore
from neuroblastoma_cnn.images import sampling
from neuroblastoma_cnn.images.online_augmentation import make_augmenter
from neuroblastoma_cnn.images.stain import as_seen_by_model, fit_stain_reference
from neuroblastoma_cnn.images.tf_input import (
    class_names,
    encode_labels,
    make_tf_dataset,
    split_tile_ids,
)
from neuroblastoma_cnn.params import TrainingParams
from neuroblastoma_cnn.runtime import distribution

from .optimizers import make_optimizer

#: Logged under the node module's name, as before the split (log filters and readers see it).
logger = logging.getLogger("neuroblastoma_cnn.pipelines.training.nodes")


#: Training tiles sampled (evenly over the training split) to fit stain normalisation.
STAIN_FIT_TILES = 256


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Inverse-frequency weights (sklearn's 'balanced'); absent classes get weight 1."""
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    present = counts > 0
    weights = np.ones(num_classes)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return {i: float(w) for i, w in enumerate(weights)}


def keras_epochs(one_pass: Any, batches: int) -> Any:
    """A one-pass dataset (``batches`` long) as an endless stream of the epochs Keras makes of
    it. Keras 3's ``EpochIterator`` iterates a dataset of known length afresh at each epoch
    start and once more at each epoch end (an iterator it drops), so a reshuffling dataset's
    epoch ``e`` is its iteration ``2e``; the dropped iteration is skipped here (not trained)
    so that a stream built from any epoch, resumed or not, has the batches Keras gave."""
    return one_pass.concatenate(one_pass.skip(batches)).repeat()


def _from_epoch(train: Any, first_epoch: int, steps: int | None) -> tuple[Any, int | None]:
    """The training input from ``first_epoch`` on, and the steps per epoch Keras needs.

    A function builds its stream from that epoch; a one-pass dataset (reshuffled at each
    iteration) becomes the endless stream of Keras' epochs (:func:`keras_epochs`: the shuffle
    seeds of successive iterations come from one seeded generator, so repetitions and
    re-iterations agree) with its first epochs skipped; arrays are the same every epoch."""
    if callable(train):
        return train(first_epoch), steps
    if isinstance(train, tuple) or first_epoch == 0:
        return train, steps
    if steps is not None:
        return train.skip(first_epoch * steps), steps
    batches = int(train.cardinality())
    if batches < 1:
        raise ParameterError("Resuming an endless training dataset needs steps_per_epoch.")
    return keras_epochs(train, batches).skip(first_epoch * batches), batches


def _one_hot(train: Any, num_classes: int) -> Any:
    if isinstance(train, tuple):
        x, y = train
        return x, np.eye(num_classes, dtype=np.float32)[np.asarray(y, dtype=int)]
    import tensorflow as tf  # noqa: PLC0415  (lazy: see the module docstring)

    return train.map(lambda x, y: (x, tf.one_hot(y, num_classes)),
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _gather_batches(positions: Any, store: Any, ids: list[int], labels: np.ndarray,
                    in_memory_limit_mb: float) -> Any:
    """Batches ``(float32 images, int64 labels)`` of the position batches ``positions``: from
    memory when the tiles fit under ``in_memory_limit_mb``, else read from the store batch by
    batch. Positions are drawn first and pixels gathered last, so skipping the epochs a
    resumed run has done costs no reading."""
    import tensorflow as tf  # noqa: PLC0415  (lazy: see the module docstring)

    tile_ids = np.asarray(ids, dtype=np.int64)
    y = tf.constant(np.asarray(labels, dtype=np.int64))
    shape = tuple(store.tile_shape)
    if len(tile_ids) * int(np.prod(shape)) <= in_memory_limit_mb * 2**20:
        images = tf.constant(np.asarray(store.get(tile_ids.tolist()), dtype=np.uint8))

        def load(at: Any) -> tuple[Any, Any]:
            return tf.cast(tf.gather(images, at), tf.float32), tf.gather(y, at)
    else:
        def read(at: np.ndarray) -> np.ndarray:
            return np.asarray(store.get(tile_ids[at].tolist()), dtype=np.uint8)

        def load(at: Any) -> tuple[Any, Any]:
            pixels = tf.numpy_function(read, [at], tf.uint8)
            pixels.set_shape((None, *shape))
            return tf.cast(pixels, tf.float32), tf.gather(y, at)
    return positions.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def training_stream(store: Any, ids: list[int], labels: np.ndarray, batch_size: int,
                    params: TrainingParams, first_step: int = 0) -> Any:
    """The recipe's training input: an endless stream of batches drawn by ``params.sampling``,
    transformed by the online augmentation, float32 in [0, 255]. In memory when the tiles fit
    under ``in_memory_limit_mb``, else gathered from the store batch by batch.

    ``first_step``: the stream starts at that batch (a resumed run's first epoch), with the
    positions and augmentation draws the uninterrupted stream has there."""
    import tensorflow as tf  # noqa: PLC0415  (lazy: see the module docstring)

    positions = sampling.index_stream(labels, params.sampling, params.seed).batch(batch_size)
    batches = _gather_batches(positions.skip(first_step), store, ids, labels,
                              params.in_memory_limit_mb)
    augmenter = make_augmenter(params.online_augmentation, params.seed)
    if augmenter.config.active:  # numbered as online_augmentation.augment_batches does
        batches = batches.enumerate(start=first_step).map(
            lambda step, batch: augmenter(batch[0], batch[1], step),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return batches.prefetch(tf.data.AUTOTUNE)


def reshuffled_passes(store: Any, ids: list[int], labels: np.ndarray, batch_size: int,
                      params: TrainingParams, first_step: int = 0) -> Any:
    """The study's training input: every tile once an epoch, reshuffled, without end; the
    batches Keras trained on when fed ``make_tf_dataset(shuffle=True)`` (see
    :func:`keras_epochs`), from batch ``first_step`` on."""
    import tensorflow as tf  # noqa: PLC0415  (lazy: see the module docstring)

    n = len(ids)
    one_pass = (tf.data.Dataset.from_tensor_slices(np.arange(n, dtype=np.int64))
                .shuffle(n, seed=params.seed, reshuffle_each_iteration=True).batch(batch_size))
    positions = keras_epochs(one_pass, -(-n // batch_size))
    return _gather_batches(positions.skip(first_step), store, ids, labels,
                           params.in_memory_limit_mb).prefetch(tf.data.AUTOTUNE)


def fit_stain(tiles: TileStore, split_table: pd.DataFrame, method: str | None,
              seed: int) -> dict[str, Any] | None:
    """The stain reference of the *training* split's original tiles (never validation or test:
    their colours must stay unseen), from at most ``STAIN_FIT_TILES`` spread over the split."""
    if method is None:
        return None
    ids = split_tile_ids(split_table, "train")
    if not ids:
        raise DataError("The split table has no training tiles to fit stain normalisation on.")
    picked = [ids[i] for i in np.linspace(0, len(ids) - 1, min(STAIN_FIT_TILES, len(ids)),
                                          dtype=int)]
    reference = fit_stain_reference(list(tiles.get(picked)), method, seed=seed)
    logger.info("Stain normalisation (%s) fitted on %d training tiles", method, len(picked))
    return reference


@dataclass
class TrainingData:
    """The tiles a run trains and validates on, with labels encoded in the store's class order.

    ``train_store`` and the validation tiles are seen through the stain reference, if any.
    ``replicas`` (of the distribution strategy) scales the learning rates when
    ``scale_learning_rate`` is on.
    """

    train_store: Any
    train_ids: list[int]
    y_train: np.ndarray
    val_ds: Any
    y_val: np.ndarray
    val_images: np.ndarray
    classes: list[str]
    params: TrainingParams
    stain_reference: dict[str, Any] | None = None
    callbacks: Sequence[Any] = ()
    replicas: int = 1

    @property
    def endless(self) -> bool:
        """True for the recipe's endless stream; False for the study's one pass per epoch."""
        p = self.params
        return (p.sampling != "shuffle" or p.online_augmentation.enabled
                or p.steps_per_epoch is not None)

    def train_ds(self, batch_size: int, shuffle: bool) -> Any:
        """Made where it is used: an in-memory dataset holds its own copy of the tiles, and the
        feature cache needs an unshuffled pass that fine-tuning must not keep alive."""
        p = self.params
        if shuffle and self.endless:
            return training_stream(self.train_store, self.train_ids, self.y_train, batch_size, p)
        return make_tf_dataset(self.train_store, self.train_ids, self.y_train, batch_size,
                               shuffle=shuffle, seed=p.seed,
                               in_memory_limit_mb=p.in_memory_limit_mb)

    def train_input(self, batch_size: int) -> Callable[[int], Any]:
        """``first_epoch -> dataset``: the shuffled training batches from that epoch on (the
        recipe's endless stream, or the study's reshuffled passes), for :func:`fit_stage`."""
        def from_epoch(first_epoch: int) -> Any:
            first_step = first_epoch * self.steps_per_epoch
            if self.endless:
                return training_stream(self.train_store, self.train_ids, self.y_train,
                                       batch_size, self.params, first_step=first_step)
            return reshuffled_passes(self.train_store, self.train_ids, self.y_train, batch_size,
                                     self.params, first_step=first_step)
        return from_epoch

    @property
    def steps_per_epoch(self) -> int:
        return sampling.steps_per_epoch(len(self.train_ids), self.params.batch_size,
                                        self.params.steps_per_epoch)

    def fit_options(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        p = self.params
        plateau = p.schedule if getattr(p.schedule, "type", None) == "plateau" else None
        weights = (balanced_class_weights(self.y_train, len(self.classes))
                   if p.class_weights else None)
        return {"num_classes": len(self.classes), "monitor": p.monitor,
                "patience": p.early_stopping_patience, "class_weight": weights,
                "history": history, "plateau": plateau, "extra_callbacks": self.callbacks,
                "label_smoothing": p.label_smoothing, "val_images": self.val_images,
                "monitor_window": p.monitor_window}

    def optimizer(self, learning_rate: float, epochs: int) -> Any:
        """Make it inside the strategy's scope (its variables belong there)."""
        p = self.params
        rate = distribution.scaled_learning_rate(learning_rate, self.replicas,
                                                 p.scale_learning_rate)
        return make_optimizer(p.optimizer, rate, p.momentum, p.schedule,
                              self.steps_per_epoch, epochs, p.weight_decay, p.ema_momentum)

    def fit_steps(self) -> int | None:
        """``steps_per_epoch`` for Keras: needed by the endless stream, None otherwise."""
        return self.steps_per_epoch if self.endless else None


def _training_data(augmented: TileStore, tiles: TileStore, split_table: pd.DataFrame,
                   params: TrainingParams, callbacks: Sequence[Any] = ()) -> TrainingData:
    classes = class_names(tiles)
    train_index = augmented.index
    val_ids = split_tile_ids(split_table, "validation")
    if not val_ids:
        raise DataError("The split table has no validation tiles: cannot select the best epoch.",
                        hint="raise splitting.validation_fraction or add patients")
    reference = fit_stain(tiles, split_table, params.stain_normalisation, params.seed)
    val_rows = tiles.rows(val_ids)
    y_val = encode_labels(val_rows["label"], classes)
    val_ds = make_tf_dataset(as_seen_by_model(tiles, reference), val_ids, y_val,
                             params.batch_size, in_memory_limit_mb=params.in_memory_limit_mb)
    return TrainingData(as_seen_by_model(augmented, reference), train_index["tile_id"].tolist(),
                        encode_labels(train_index["label"], classes), val_ds, y_val,
                        val_rows["image_path"].astype(str).to_numpy(), classes, params,
                        reference, callbacks)
