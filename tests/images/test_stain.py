"""Stain normalisation: a stain-shifted image is mapped closer to the reference appearance;
background is spared; references are JSON-able and checked."""

from __future__ import annotations

import json

import numpy as np
import pytest

from neuroblastoma_cnn.core.errors import DataError, ParameterError
from neuroblastoma_cnn.images import stain

H_E = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
# Another lab: bluer haematoxylin, pinker eosin, stronger staining overall.
H_E_SHIFTED = np.array([[0.50, 0.72, 0.48], [0.18, 0.95, 0.25]])


def synthetic_slide(stains: np.ndarray, strength: float, seed: int = 0,
                    background: float = 0.3) -> np.ndarray:
    """Two-stain tissue on white glass: a ``background`` share of pixels is unstained."""
    rng = np.random.default_rng(seed)
    n = 64 * 64
    conc = rng.gamma(2.0, 0.35, (n, 2)) * strength
    conc[rng.random(n) < background] = 0.0
    stains = stains / np.linalg.norm(stains, axis=1, keepdims=True)
    return stain.rgb_from_optical_density(conc @ stains).reshape(64, 64, 3)


def tissue_lab_stats(image: np.ndarray) -> np.ndarray:
    flat = image.reshape(-1, 3)
    lab = stain.rgb_to_lab(flat[stain.tissue_od_mask(stain.optical_density(flat))])
    return np.concatenate([lab.mean(axis=0), lab.std(axis=0)])


@pytest.mark.parametrize("method", stain.METHODS)
def test_normalisation_moves_a_stain_shifted_image_towards_the_reference(method):
    reference_images = [synthetic_slide(H_E, 1.0, seed=s) for s in range(3)]
    reference = stain.fit_stain_reference(reference_images, method)
    json.dumps(reference)  # storable in the model's preprocessing record
    target = tissue_lab_stats(reference_images[0])

    shifted = synthetic_slide(H_E_SHIFTED, 1.4, seed=7)
    normalised = stain.normalise_stain(shifted, reference)
    assert normalised.dtype == np.uint8 and normalised.shape == shifted.shape
    before = np.abs(tissue_lab_stats(shifted) - target).sum()
    after = np.abs(tissue_lab_stats(normalised) - target).sum()
    assert after < 0.5 * before


def test_macenko_recovers_the_stain_vectors():
    images = [synthetic_slide(H_E_SHIFTED, 1.0, seed=s) for s in range(2)]
    fitted = np.asarray(stain.fit_stain_reference(images, "macenko")["stain_matrix"])
    truth = H_E_SHIFTED / np.linalg.norm(H_E_SHIFTED, axis=1, keepdims=True)
    assert np.all(np.sum(fitted * truth, axis=1) > 0.98)  # cosine of each stain vector


@pytest.mark.parametrize("method", stain.METHODS)
def test_background_heavy_images_fit_on_tissue_and_keep_white_glass(method):
    mostly_glass = [synthetic_slide(H_E, 1.0, seed=s, background=0.9) for s in range(3)]
    balanced = [synthetic_slide(H_E, 1.0, seed=s, background=0.2) for s in range(3)]
    a = stain.fit_stain_reference(mostly_glass, method)
    b = stain.fit_stain_reference(balanced, method)
    key = "stain_matrix" if method == "macenko" else "mean"
    assert np.allclose(a[key], b[key], atol=0.05 if method == "macenko" else 2.0)

    image = synthetic_slide(H_E_SHIFTED, 1.4, seed=3, background=0.5)
    out = stain.normalise_stain(image, b)
    glass = image.reshape(-1, 3).min(axis=1) >= 254
    assert glass.any() and np.all(out.reshape(-1, 3)[glass] >= 250)


@pytest.mark.parametrize("method", stain.METHODS)
def test_an_image_without_tissue_is_returned_unchanged(method):
    reference = stain.fit_stain_reference([synthetic_slide(H_E, 1.0)], method)
    blank = np.full((32, 32, 3), 250, np.uint8)
    assert np.array_equal(stain.normalise_stain(blank, reference), blank)


def test_bad_inputs_fail_clearly():
    with pytest.raises(ParameterError, match="method"):
        stain.fit_stain_reference([synthetic_slide(H_E, 1.0)], "vahadane")
    with pytest.raises(DataError, match="tissue"):
        stain.fit_stain_reference([np.full((32, 32, 3), 255, np.uint8)], "macenko")
    with pytest.raises(DataError, match="uint8"):
        stain.fit_stain_reference([np.zeros((8, 8, 3), np.float32)], "macenko")
    with pytest.raises(ParameterError, match="lacks"):
        stain.normalise_stain(synthetic_slide(H_E, 1.0), {"method": "reinhard", "mean": [0]})


def test_lab_round_trip():
    rgb = np.random.default_rng(0).integers(0, 256, (500, 3)).astype(np.uint8)
    assert np.abs(stain.lab_to_rgb(stain.rgb_to_lab(rgb)).astype(int) - rgb).max() <= 1


def test_normalise_tiles_is_per_tile_and_a_no_op_without_reference():
    tiles = np.stack([synthetic_slide(H_E_SHIFTED, 1.4, seed=s) for s in range(3)])
    assert stain.normalise_tiles(tiles, None) is tiles or np.array_equal(
        stain.normalise_tiles(tiles, None), tiles)
    reference = stain.fit_stain_reference([synthetic_slide(H_E, 1.0)], "reinhard")
    out = stain.normalise_tiles(tiles, reference)
    assert out.shape == tiles.shape and out.dtype == np.uint8
    assert np.array_equal(out[1], stain.normalise_stain(tiles[1], reference))


def test_normalised_view_of_a_store_normalises_get_and_passes_the_rest():
    class Store:
        tile_shape = (64, 64, 3)
        tiles = np.stack([synthetic_slide(H_E_SHIFTED, 1.4, seed=s) for s in range(2)])

        def get(self, ids):
            return self.tiles[list(ids)]

    store = Store()
    assert stain.as_seen_by_model(store, None) is store
    reference = stain.fit_stain_reference([synthetic_slide(H_E, 1.0)], "macenko")
    view = stain.as_seen_by_model(store, reference)
    assert view.tile_shape == (64, 64, 3)
    assert np.array_equal(view.get([1]), stain.normalise_tiles(store.tiles[[1]], reference))
