"""Synthetic tissue-like images whose colour and texture depend on their class: for the tests
of the classical floor (no BACH needed)."""

from __future__ import annotations

import numpy as np

# Deliberately not 4 or 5 classes, and names that sort differently from their creation order.
CLASSES = ("zeta_smooth_pink", "Alpha_purple_dots", "mid stripes")


def tissue(label: str, rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """An RGB uint8 image whose colour and texture depend on its class (and a little on chance)."""
    y, x = np.mgrid[:size, :size]
    shift = rng.integers(-12, 13, 3)
    if label == CLASSES[0]:  # eosin-pink, smooth
        base = np.array([235, 160, 200]) + shift
        image = base + rng.normal(0, 3, (size, size, 3))
    elif label == CLASSES[1]:  # purple nuclei on pale background
        image = np.full((size, size, 3), 240.0) + shift
        for cy, cx in rng.integers(0, size, (60, 2)):
            image[(y - cy) ** 2 + (x - cx) ** 2 < 9] = [90, 40, 140]
    else:  # blue-grey stripes
        period = 6 + rng.integers(0, 3)
        stripes = (np.sin(2 * np.pi * x / period) > 0)[..., None]
        image = np.where(stripes, [120, 140, 200], [210, 215, 235]) + shift
    return np.clip(image, 0, 255).astype(np.uint8)
