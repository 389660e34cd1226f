"""H&E stain normalisation (Macenko, Reinhard) in NumPy: fit a small reference, apply it.

Slides from different labs, scanners or staining days differ in colour more than tissue classes
sometimes do; a network trained on few patients learns those colours. Normalisation maps every
image onto one reference appearance. The reference is *fitted on training images only* (a fit
that saw test images would leak their colours) and is a small JSON-able dict, stored with the
model so prediction applies exactly the same mapping.

Both methods measure colour on *tissue* pixels only: glass and fat are white in every lab, so
background-heavy images would otherwise drag the statistics towards white. Background pixels are
left as they are (Reinhard) or follow from near-zero stain concentrations (Macenko). An image with
too little tissue to measure is returned unchanged rather than mapped by noise.

- Macenko et al. 2009, "A method for normalizing histology slides for quantitative analysis":
  stain vectors from the plane of the two main optical-density directions, extreme angles.
- Reinhard et al. 2001, "Color transfer between images": per-channel mean and standard deviation
  matched in a perceptual colour space (CIE L*a*b* here).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from neuroblastoma_cnn.core.errors import DataError, ParameterError

logger = logging.getLogger(__name__)

METHODS = ("macenko", "reinhard")

# Ruifrok & Johnston's H&E-DAB stain vectors (as in scikit-image): rows are the optical density
# of haematoxylin, eosin and DAB in R, G, B. Stain jitter (offline in the augmentation pipeline,
# online in training) scales and shifts each stain's amount along these axes.
RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64
)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)

# Optical density of a pixel: -ln((I + 1) / 256), so 0 for white and finite for black.
_IO = 256.0
# Total optical density (summed over R, G, B) above which a pixel is stained tissue.
OD_THRESHOLD = 0.15
# Fewer tissue pixels than this and an image's colour cannot be measured: it is left unchanged.
MIN_TISSUE_PIXELS = 500
# Pixels sampled per image when fitting, so a fit over many large images stays small and fast.
FIT_PIXELS_PER_IMAGE = 20_000


def _check_rgb(image: np.ndarray, name: str = "image") -> np.ndarray:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise DataError(f"{name}: expected an RGB image (H, W, 3), got shape {array.shape}.")
    if array.dtype != np.uint8:
        raise DataError(f"{name}: expected uint8 pixels, got {array.dtype}.")
    return array


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Beer-Lambert optical density of uint8 RGB, float64, 0 for white."""
    return -np.log((rgb.astype(np.float64) + 1.0) / _IO)


def rgb_from_optical_density(od: np.ndarray) -> np.ndarray:
    """Inverse of :func:`optical_density`, rounded and clipped to uint8."""
    return np.clip(np.rint(_IO * np.exp(-od) - 1.0), 0, 255).astype(np.uint8)


def tissue_od_mask(od: np.ndarray, threshold: float = OD_THRESHOLD) -> np.ndarray:
    """Stained pixels: total optical density above ``threshold`` (glass and fat fall below).

    The sum over channels (not each channel) keeps pale, mostly-eosin pixels whose blue channel
    is nearly transparent, which a per-channel rule would drop.
    """
    return od.sum(axis=-1) > threshold


def _sample(pixels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if len(pixels) <= n:
        return pixels
    return pixels[rng.choice(len(pixels), n, replace=False)]


# ------------------------------------------------------------------------------- Macenko


def macenko_stain_matrix(od_pixels: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """Two unit stain vectors (rows: haematoxylin, eosin) from tissue optical densities (n, 3).

    The OD pixels are projected onto the plane of their two main directions; the stains are the
    directions at the ``alpha`` and ``100 - alpha`` percentiles of the angle in that plane.
    Haematoxylin is the one with more red absorption (it is blue-purple).
    """
    if len(od_pixels) < 3:
        raise DataError("Too few tissue pixels to estimate stain vectors.")
    # Eigen-directions of the (uncentred) OD scatter, as in Macenko's paper.
    _, vectors = np.linalg.eigh(od_pixels.T @ od_pixels / len(od_pixels))
    plane = vectors[:, [2, 1]]  # largest two, largest first
    plane = plane * np.where(plane[0] < 0, -1.0, 1.0)  # point into positive OD
    projected = od_pixels @ plane
    angles = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angles, [alpha, 100 - alpha])
    v1 = plane @ np.array([np.cos(low), np.sin(low)])
    v2 = plane @ np.array([np.cos(high), np.sin(high)])
    stains = np.stack([v1, v2]) if v1[0] > v2[0] else np.stack([v2, v1])
    stains = np.abs(stains)  # numerical noise can give tiny negatives; stains absorb, >= 0
    return stains / np.linalg.norm(stains, axis=1, keepdims=True)


def stain_concentrations(od_pixels: np.ndarray, stain_matrix: np.ndarray) -> np.ndarray:
    """Least-squares concentrations (n, 2) of the two stains that explain each OD pixel."""
    concentrations, *_ = np.linalg.lstsq(stain_matrix.T, od_pixels.T, rcond=None)
    return concentrations.T


def _fit_macenko(od_pixels: np.ndarray, alpha: float, max_percentile: float) -> dict[str, Any]:
    stains = macenko_stain_matrix(od_pixels, alpha)
    concentrations = stain_concentrations(od_pixels, stains)
    max_c = np.percentile(concentrations, max_percentile, axis=0)
    return {"stain_matrix": stains.tolist(), "max_concentrations": max_c.tolist()}


def _apply_macenko(rgb: np.ndarray, reference: Mapping[str, Any]) -> np.ndarray:
    od = optical_density(rgb).reshape(-1, 3)
    tissue = tissue_od_mask(od)
    if tissue.sum() < MIN_TISSUE_PIXELS:
        return rgb.copy()
    alpha = float(reference.get("alpha", 1.0))
    percentile = float(reference.get("max_percentile", 99.0))
    own = _fit_macenko(od[tissue], alpha, percentile)
    own_stains = np.asarray(own["stain_matrix"])
    own_max = np.maximum(np.asarray(own["max_concentrations"]), 1e-6)
    concentrations = stain_concentrations(od, own_stains)
    concentrations *= np.asarray(reference["max_concentrations"]) / own_max
    out_od = concentrations @ np.asarray(reference["stain_matrix"])
    return rgb_from_optical_density(out_od).reshape(rgb.shape)


# ------------------------------------------------------------------------------ Reinhard

# sRGB (D65) to CIE XYZ, and the D65 white point.
_XYZ_FROM_RGB = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
     [0.019334, 0.119193, 0.950227]]
)
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB)
_WHITE = np.array([0.950456, 1.0, 1.088754])


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 sRGB (..., 3) to CIE L*a*b* (D65), float64."""
    c = rgb.astype(np.float64) / 255.0
    linear = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = linear @ _XYZ_FROM_RGB.T / _WHITE
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    lightness = 116.0 * f[..., 1] - 16.0
    a = 500.0 * (f[..., 0] - f[..., 1])
    b = 200.0 * (f[..., 1] - f[..., 2])
    return np.stack([lightness, a, b], axis=-1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (D65) to uint8 sRGB, clipped to the gamut."""
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], axis=-1)
    xyz = np.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / 7.787) * _WHITE
    linear = np.clip(xyz @ _RGB_FROM_XYZ.T, 0.0, 1.0)
    c = np.where(linear > 0.0031308, 1.055 * linear ** (1 / 2.4) - 0.055, 12.92 * linear)
    return np.clip(np.rint(c * 255.0), 0, 255).astype(np.uint8)


def _apply_reinhard(rgb: np.ndarray, reference: Mapping[str, Any]) -> np.ndarray:
    flat = rgb.reshape(-1, 3)
    tissue = tissue_od_mask(optical_density(flat))
    if tissue.sum() < MIN_TISSUE_PIXELS:
        return rgb.copy()
    lab = rgb_to_lab(flat[tissue])
    mean, std = lab.mean(axis=0), np.maximum(lab.std(axis=0), 1e-6)
    mapped = (lab - mean) / std * np.asarray(reference["std"]) + np.asarray(reference["mean"])
    out = flat.copy()
    out[tissue] = lab_to_rgb(mapped)
    return out.reshape(rgb.shape)


# ------------------------------------------------------------------------------ public API


def fit_stain_reference(
    images: Iterable[np.ndarray],
    method: str = "macenko",
    *,
    seed: int = 0,
    pixels_per_image: int = FIT_PIXELS_PER_IMAGE,
    alpha: float = 1.0,
    max_percentile: float = 99.0,
) -> dict[str, Any]:
    """A JSON-able reference fitted on the tissue pixels of ``images`` (uint8 RGB arrays).

    Pass training images (or tiles) only. Each image contributes at most ``pixels_per_image``
    randomly sampled tissue pixels, so large images do not dominate and memory stays small.
    """
    if method not in METHODS:
        raise ParameterError(f"Unknown stain normalisation method '{method}': use {METHODS}.")
    rng = np.random.default_rng(seed)
    pooled: list[np.ndarray] = []
    n_images = 0
    for i, image in enumerate(images):
        rgb = _check_rgb(image, f"image {i}").reshape(-1, 3)
        od = optical_density(rgb)
        tissue = tissue_od_mask(od)
        n_images += 1
        if tissue.sum() == 0:
            continue
        picked = _sample(np.flatnonzero(tissue), pixels_per_image, rng)
        pooled.append(rgb[picked])
    if not pooled or sum(len(p) for p in pooled) < MIN_TISSUE_PIXELS:
        raise DataError(
            f"Cannot fit stain normalisation: the {n_images} image(s) given hold fewer than "
            f"{MIN_TISSUE_PIXELS} tissue pixels (optical density above {OD_THRESHOLD})."
        )
    pixels = np.concatenate(pooled)
    reference: dict[str, Any] = {"method": method, "n_images": n_images,
                                 "n_pixels": len(pixels)}
    if method == "macenko":
        reference.update(alpha=alpha, max_percentile=max_percentile,
                         **_fit_macenko(optical_density(pixels), alpha, max_percentile))
    else:
        lab = rgb_to_lab(pixels)
        reference.update(mean=lab.mean(axis=0).tolist(), std=lab.std(axis=0).tolist())
    return reference


def check_stain_reference(reference: Mapping[str, Any]) -> None:
    """Fails with a clear message when a stored reference is not one this module wrote."""
    method = reference.get("method") if isinstance(reference, Mapping) else None
    needed = {"macenko": ("stain_matrix", "max_concentrations"), "reinhard": ("mean", "std")}
    if method not in needed:
        raise ParameterError(f"Stain reference has unknown method {method!r}: use {METHODS}.")
    missing = [k for k in needed[method] if k not in reference]
    if missing:
        raise ParameterError(f"Stain reference ({method}) lacks {missing}.")


def normalise_stain(image: np.ndarray, reference: Mapping[str, Any]) -> np.ndarray:
    """``image`` (uint8 RGB) mapped onto the reference's stain appearance, uint8 RGB."""
    check_stain_reference(reference)
    rgb = _check_rgb(image)
    if reference["method"] == "macenko":
        return _apply_macenko(rgb, reference)
    return _apply_reinhard(rgb, reference)


def normalise_tiles(tiles: np.ndarray, reference: Mapping[str, Any] | None) -> np.ndarray:
    """A batch ``[n, H, W, 3]`` of uint8 tiles, each normalised (unchanged if no reference)."""
    if not reference:
        return np.asarray(tiles)
    check_stain_reference(reference)
    batch = np.asarray(tiles)
    return np.stack([normalise_stain(t, reference) for t in batch]) if len(batch) else batch


class NormalisedTiles:
    """A tile store seen through a stain reference: ``get`` returns normalised tiles, everything
    else (index, rows, metadata, tile_shape) is the store's. Lets the tf.data input, evaluation
    and Grad-CAM read tiles as the model saw them in training without a second store on disk.
    """

    def __init__(self, store: Any, reference: Mapping[str, Any]):
        check_stain_reference(reference)
        self._store = store
        self.reference = dict(reference)

    def get(self, ids: Any) -> np.ndarray:
        return normalise_tiles(self._store.get(ids), self.reference)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def as_seen_by_model(store: Any, reference: Mapping[str, Any] | None) -> Any:
    """``store`` itself without a reference, else its :class:`NormalisedTiles` view."""
    return store if not reference else NormalisedTiles(store, reference)
