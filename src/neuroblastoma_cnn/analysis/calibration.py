"""Calibration: expected calibration error, reliability diagrams and temperature scaling.

Why: a macro-F1 says how often the top class is right, not whether a "0.9" means nine times in
ten; a pathologist reading a probability needs the latter. ECE (Guo et al., 2017) bins the
images by their top probability (15 equal-width bins) and averages |accuracy - confidence|
weighted by the bins' sizes. Temperature scaling divides the log-probabilities by one scalar
T > 0 fitted on the validation images (T > 1 softens an over-confident model, T < 1 sharpens);
it never changes the predicted class.

The models output softmax probabilities, so scaling works on their logarithm:
``softmax(log p / T)`` equals ``softmax(z / T)`` for the logits ``z`` (a softmax is unchanged by
a constant added to every logit). T is applied to each tile's output, and an image's
probabilities stay the mean of its tiles': the fit minimises the negative log-likelihood of
those image-level means, as they are reported. Pure NumPy/SciPy/matplotlib.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from scipy.optimize import minimize_scalar

from neuroblastoma_cnn.core.errors import DataError

N_BINS = 15
#: Probabilities are clipped here before their logarithm (a softmax output of exactly 0).
EPS = 1e-12
#: Search range of T: far beyond what a trained network needs, and keeps exp() finite.
T_BOUNDS = (0.05, 20.0)


def apply_temperature(prob: Any, temperature: float | None) -> np.ndarray:
    """``softmax(log p / T)`` row by row; ``T`` None or 1 returns the probabilities as they are."""
    p = np.asarray(prob, dtype=np.float64)
    if temperature is None or temperature == 1.0 or p.size == 0:
        return p
    if not temperature > 0:
        raise DataError(f"temperature = {temperature!r}: must be > 0.")
    z = np.log(np.clip(p, EPS, 1.0)) / float(temperature)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def image_means(tile_prob: np.ndarray, image_index: np.ndarray, n_images: int) -> np.ndarray:
    """Mean of the tile rows of each image (``image_index``: 0..n_images-1 per tile)."""
    counts = np.bincount(image_index, minlength=n_images).astype(np.float64)
    sums = np.stack([np.bincount(image_index, weights=tile_prob[:, c], minlength=n_images)
                     for c in range(tile_prob.shape[1])], axis=1)
    return sums / np.maximum(counts, 1.0)[:, None]


def _checked(prob: Any, y_true: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(prob, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64)
    if p.ndim != 2 or len(p) != len(y) or len(p) == 0:
        raise DataError(f"Calibration needs one probability row per label: got probabilities "
                        f"of shape {p.shape} and {len(y)} labels.")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise DataError(f"Labels must lie in 0..{p.shape[1] - 1}; got {y.min()}..{y.max()}.")
    return p, y


def bin_statistics(y_true: Any, prob: Any, n_bins: int = N_BINS) -> dict[str, np.ndarray]:
    """Per confidence bin ``(k/n, (k+1)/n]``: count, mean confidence, accuracy."""
    p, y = _checked(prob, y_true)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.digitize(confidence, edges[1:-1], right=True)
    count = np.bincount(which, minlength=n_bins).astype(np.float64)
    safe = np.maximum(count, 1.0)
    return {
        "edges": edges,
        "count": count,
        "confidence": np.bincount(which, weights=confidence, minlength=n_bins) / safe,
        "accuracy": np.bincount(which, weights=correct, minlength=n_bins) / safe,
    }


def expected_calibration_error(y_true: Any, prob: Any, n_bins: int = N_BINS) -> float:
    """ECE: sum over bins of |bin| / n * |accuracy - mean confidence| (top-class confidence)."""
    stats = bin_statistics(y_true, prob, n_bins)
    gaps = np.abs(stats["accuracy"] - stats["confidence"])
    return float((stats["count"] * gaps).sum() / stats["count"].sum())


def image_nll(tile_prob: np.ndarray, y_image: np.ndarray, image_index: np.ndarray,
              temperature: float) -> float:
    """Mean negative log-likelihood of the image-level probabilities after scaling the tiles."""
    images = image_means(apply_temperature(tile_prob, temperature), image_index, len(y_image))
    return float(-np.log(np.clip(images[np.arange(len(y_image)), y_image], EPS, 1.0)).mean())


def fit_temperature(tile_prob: Any, y_image: Any,
                    image_index: Sequence[int] | np.ndarray | None = None) -> float:
    """The T in ``T_BOUNDS`` minimising the image-level NLL (bounded search on log T).

    ``image_index``: the image (0..n_images-1) of each tile row; None = one tile per image.
    """
    p = np.asarray(tile_prob, dtype=np.float64)
    y = np.asarray(y_image, dtype=np.int64)
    index = np.arange(len(p)) if image_index is None else np.asarray(image_index, np.int64)
    if len(index) != len(p) or len(y) == 0 or index.max() >= len(y):
        raise DataError(f"Temperature fit: {len(p)} tile rows, {len(index)} image indices and "
                        f"{len(y)} image labels do not match.")
    result = minimize_scalar(
        lambda log_t: image_nll(p, y, index, float(np.exp(log_t))),
        bounds=tuple(np.log(T_BOUNDS)), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(result.x))


def plot_reliability(y_true: Any, panels: dict[str, Any], title: str,
                     n_bins: int = N_BINS) -> Figure:
    """Reliability diagram, one panel per probability set (e.g. before / after scaling):
    accuracy per confidence bin against the diagonal, the gap shaded, ECE in the title."""
    fig = Figure(figsize=(4.2 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, prob) in zip(axes, panels.items(), strict=True):
        stats = bin_statistics(y_true, prob, n_bins)
        centers = (stats["edges"][:-1] + stats["edges"][1:]) / 2
        width = 1.0 / n_bins
        shown = stats["count"] > 0
        ax.bar(centers[shown], stats["accuracy"][shown], width=width, edgecolor="black",
               color="tab:blue", label="accuracy")
        ax.bar(centers[shown], stats["confidence"][shown] - stats["accuracy"][shown],
               bottom=stats["accuracy"][shown], width=width, color="tab:red", alpha=0.3,
               label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top probability)",
               ylabel="accuracy",
               title=f"{name}: ECE {expected_calibration_error(y_true, prob, n_bins):.3f}")
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"{title} ({len(np.asarray(y_true))} images, {n_bins} bins)", fontsize=10)
    return fig
