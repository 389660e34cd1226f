"""tf.data input from tile stores (tf_input.py) on synthetic stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from _params import store_metadata

from neuroblastoma_cnn.core.errors import DataError
from neuroblastoma_cnn.datasets import write_tile_store
from neuroblastoma_cnn.images.tf_input import class_names, encode_labels, make_tf_dataset

CLASSES = ["alpha", "beta", "gamma"]


@pytest.fixture
def train(tmp_path: Path):
    rng = np.random.default_rng(1)

    def records():
        for c, name in enumerate(CLASSES):
            for i in range(10):
                tile = rng.normal(60 + 70 * c, 20, (16, 16, 3)).clip(0, 255).astype(np.uint8)
                yield tile, {"label": name, "group": f"{name}-{i}", "image_path": f"{name}/{i}"}

    return write_tile_store(tmp_path / "train", records(), store_metadata(CLASSES, 16), 16)


def test_dataset_streaming_equals_in_memory(train) -> None:
    ids = train.index["tile_id"].tolist()[::-1]
    labels = np.arange(len(ids)) % 3
    in_memory = list(make_tf_dataset(train, ids, labels, 8, in_memory_limit_mb=2048))
    streamed = list(make_tf_dataset(train, ids, labels, 8, in_memory_limit_mb=0))
    assert len(in_memory) == len(streamed) == 4
    for (xa, ya), (xb, yb) in zip(in_memory, streamed, strict=True):
        assert xa.dtype.name == "float32"
        np.testing.assert_array_equal(xa.numpy(), xb.numpy())
        np.testing.assert_array_equal(ya.numpy(), yb.numpy())
    np.testing.assert_array_equal(in_memory[0][0].numpy()[0], train.get([ids[0]])[0])


def test_shuffle_is_seeded(train) -> None:
    ids = train.index["tile_id"].tolist()
    labels = np.array(ids)

    def order(seed: int) -> list[int]:
        data = make_tf_dataset(train, ids, labels, 64, shuffle=True, seed=seed,
                               in_memory_limit_mb=2048)
        return next(iter(data))[1].numpy().tolist()

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == ids




def test_augment_is_applied_to_training_batches_in_order(train) -> None:
    ids = train.index["tile_id"].tolist()
    labels = np.arange(len(ids)) % 3
    plain = list(make_tf_dataset(train, ids, labels, 8, in_memory_limit_mb=2048))
    for limit in (2048, 0):  # in memory and streamed from the shards
        shifted = list(make_tf_dataset(train, ids, labels, 8, in_memory_limit_mb=limit,
                                       augment=lambda x: 255.0 - x))
        for (xa, ya), (xb, yb) in zip(plain, shifted, strict=True):
            assert xb.dtype == tf.float32
            np.testing.assert_array_equal(255.0 - xa.numpy(), xb.numpy())
            np.testing.assert_array_equal(ya.numpy(), yb.numpy())


def test_class_names_and_labels(train) -> None:
    assert class_names(train) == CLASSES
    assert encode_labels(pd.Series(["beta", "alpha"]), CLASSES).tolist() == [1, 0]
    with pytest.raises(DataError, match=r"\['z'\] are not among"):
        encode_labels(pd.Series(["z"]), CLASSES)
