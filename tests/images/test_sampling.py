"""Balanced and shuffled sampling: proportions, coverage, seeded repeatability."""

from __future__ import annotations

import numpy as np
import pytest

from neuroblastoma_cnn.core.errors import ParameterError
from neuroblastoma_cnn.images import sampling


def draw(labels: np.ndarray, mode: str, n: int, seed: int = 0) -> np.ndarray:
    stream = sampling.index_stream(labels, mode, seed)
    return np.array([int(i) for _, i in zip(range(n), stream, strict=False)])


def test_balanced_sampling_draws_classes_equally_from_imbalanced_labels():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 3)
    picks = draw(labels, "balanced", 3000)
    shares = np.bincount(labels[picks], minlength=3) / len(picks)
    assert np.allclose(shares, 1 / 3, atol=0.03)
    assert set(picks[labels[picks] == 2]) == {99, 100, 101}  # rare class: all its samples
    assert len(set(picks[labels[picks] == 0])) == 90  # common class: none cut


def test_shuffle_visits_every_sample_once_per_pass_in_new_orders():
    labels = np.array([0] * 7 + [1] * 3)
    picks = draw(labels, "shuffle", 30)
    for p in range(3):
        assert sorted(picks[10 * p : 10 * p + 10]) == list(range(10))
    assert not np.array_equal(picks[:10], picks[10:20])


@pytest.mark.parametrize("mode", sampling.SAMPLINGS)
def test_same_seed_same_stream(mode):
    labels = np.array([0, 0, 0, 1, 1, 2])
    assert np.array_equal(draw(labels, mode, 50, 5), draw(labels, mode, 50, 5))
    assert not np.array_equal(draw(labels, mode, 50, 5), draw(labels, mode, 50, 6))


def test_batched_training_data_pairs_pixels_with_their_labels():
    labels = np.array([0] * 5 + [1] * 2)
    images = np.zeros((7, 4, 4, 3), np.uint8) + np.arange(7, dtype=np.uint8)[:, None, None, None]
    ds = sampling.batched_training_data(images, labels, batch_size=4, sampling="balanced",
                                        seed=1)
    gathered = sampling.batched_training_data(lambda ids: images[ids], labels, batch_size=4,
                                              sampling="balanced", seed=1,
                                              tile_shape=(4, 4, 3))
    for (batch, y), (gx, gy) in zip(ds.take(5), gathered.take(5), strict=True):
        x = batch.numpy()
        assert x.dtype == np.float32 and x.shape == (4, 4, 4, 3)
        assert np.array_equal(labels[x[:, 0, 0, 0].astype(int)], y.numpy())
        assert np.array_equal(x, gx.numpy()) and np.array_equal(y.numpy(), gy.numpy())


def test_steps_per_epoch():
    assert sampling.steps_per_epoch(100, 16) == 7
    assert sampling.steps_per_epoch(100, 16, 3) == 3
    with pytest.raises(ParameterError):
        sampling.steps_per_epoch(100, 16, 0)
    with pytest.raises(ParameterError, match="sampling"):
        sampling.index_stream(np.array([0, 1]), "oversample", 0)
