"""Online augmentation: exact symmetries, seeded determinism, fresh draws per step, each
transform doing what it says (and nothing when off)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from neuroblastoma_cnn.core.errors import ParameterError
from neuroblastoma_cnn.images import online_augmentation as oa
from neuroblastoma_cnn.images.online_augmentation import _random_stain

ALL_ON = {"enabled": True, "dihedral": True, "stain_jitter": 0.05, "brightness": 0.1,
          "contrast": 0.1, "saturation": 0.1, "scale": 0.1, "translate": 0.05, "crop": 0.2}


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (6, 16, 16, 3)).astype(np.float32)


def run(config: dict, images: np.ndarray, step: int = 0, seed: int = 1) -> np.ndarray:
    out, labels = oa.make_augmenter(config, seed)(images, np.arange(len(images)), step)
    assert np.array_equal(np.asarray(labels), np.arange(len(images)))
    return np.asarray(out)


def test_dihedral_ops_are_the_eight_distinct_pixel_permutations(batch):
    seen = set()
    for k in range(oa.N_DIHEDRAL):
        out = np.asarray(oa.dihedral(batch, k))
        assert np.array_equal(out, oa.dihedral_numpy(batch, k))
        # a permutation of each image's pixels: same multiset of RGB triples
        for a, b in zip(batch, out, strict=True):
            assert np.array_equal(np.sort(a.reshape(-1, 3), axis=0), np.sort(b.reshape(-1, 3),
                                                                             axis=0))
        seen.add(out.tobytes())
    assert len(seen) == 8
    assert np.array_equal(np.asarray(oa.dihedral(batch, 0)), batch)
    assert np.array_equal(oa.dihedral_numpy(batch, 3), np.rot90(batch, 2, axes=(1, 2)))


def test_random_dihedral_gives_each_image_one_exact_symmetry(batch):
    out = run({"enabled": True, "dihedral": True}, batch, step=5)
    variants = np.stack([oa.dihedral_numpy(batch, k) for k in range(8)], axis=1)
    for i in range(len(batch)):
        assert any(np.array_equal(out[i], v) for v in variants[i])
    # over many steps every symmetry is drawn
    drawn = set()
    for step in range(40):
        out = run({"enabled": True, "dihedral": True}, batch[:1], step=step)
        drawn |= {k for k in range(8) if np.array_equal(out[0], variants[0, k])}
    assert drawn == set(range(8))


def test_same_seed_and_step_repeat_exactly_other_steps_and_seeds_differ(batch):
    a = run(ALL_ON, batch, step=3)
    assert np.array_equal(a, run(ALL_ON, batch, step=3))
    assert not np.allclose(a, run(ALL_ON, batch, step=4))
    assert not np.allclose(a, run(ALL_ON, batch, step=3, seed=2))
    assert a.dtype == np.float32 and a.min() >= 0 and a.max() <= 255


def test_off_is_the_identity(batch):
    assert np.array_equal(run({"enabled": False, **{k: v for k, v in ALL_ON.items()
                                                    if k != "enabled"}}, batch), batch)
    assert np.array_equal(run({"enabled": True}, batch), batch)


def test_switching_one_transform_off_keeps_the_others_draws(batch):
    both = run({"enabled": True, "dihedral": True, "brightness": 0.2}, batch, step=7)
    dihedral_only = run({"enabled": True, "dihedral": True}, batch, step=7)
    shift = both - dihedral_only  # brightness adds a per-image constant (before clipping)
    inside = (dihedral_only > 60) & (dihedral_only < 190)
    for i in range(len(batch)):
        values = shift[i][inside[i]]
        assert np.ptp(values) < 1e-3 and abs(values.mean()) > 0


def test_colour_transforms_keep_geometry_and_stay_close(batch):
    out = run({"enabled": True, "stain_jitter": 0.05, "saturation": 0.1}, batch, step=1)
    assert not np.allclose(out, batch)
    assert np.abs(out - batch).mean() < 25


@pytest.mark.parametrize("space", ["hed", "od"])
def test_stain_jitter_at_zero_strength_path_is_identity_up_to_float(batch, space):
    out = np.asarray(_random_stain(batch, np.array([1, 2]), 0.0, space))
    assert np.allclose(out, batch, atol=0.05)


def test_geometry_crop_zooms_in(batch):
    # A smooth horizontal ramp: zooming into a sub-square narrows the ramp's range.
    ramp = np.tile(np.linspace(0, 255, 32, dtype=np.float32)[None, None, :, None],
                   (4, 32, 1, 3))
    out = run({"enabled": True, "crop": 0.5}, ramp, step=2)
    ranges = out[:, 16, :, 0].max(axis=1) - out[:, 16, :, 0].min(axis=1)
    assert np.all(ranges < 255 * 0.999) and np.all(ranges > 255 * 0.45)


def test_augment_batches_draws_afresh_across_epochs_of_a_repeated_dataset():
    images = np.random.default_rng(1).integers(0, 256, (8, 8, 8, 3)).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((images, np.arange(8))).batch(8).repeat()
    aug = oa.make_augmenter({"enabled": True, "dihedral": True, "brightness": 0.1}, 3)

    def first(n: int) -> list[np.ndarray]:
        return [b[0].numpy() for _, b in zip(range(n), oa.augment_batches(ds, aug),
                                             strict=False)]

    one, two = first(3), first(3)
    assert all(np.array_equal(a, b) for a, b in zip(one, two, strict=True))
    assert not np.allclose(one[0], one[1])  # epoch 1 and epoch 2 of the same images


def test_every_transform_runs_inside_a_tf_data_graph():
    images = np.random.default_rng(2).integers(0, 256, (4, 16, 16, 3)).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((images, np.arange(4))).batch(2).repeat()
    out = [b[0].numpy() for _, b in zip(range(3), oa.augment_batches(
        ds, oa.make_augmenter(ALL_ON, 0)), strict=False)]
    assert all(o.shape == (2, 16, 16, 3) for o in out)
    eager = run(ALL_ON, images[:2], step=0, seed=0)
    assert np.allclose(out[0], eager, atol=1e-3)  # graph and eager draw the same


def test_bad_parameters_fail_clearly():
    with pytest.raises(ParameterError, match="Unknown online augmentation"):
        oa.OnlineAugmentation.from_config({"rotation": 3})
    with pytest.raises(ParameterError, match="crop"):
        oa.OnlineAugmentation.from_config({"crop": 1.5})
