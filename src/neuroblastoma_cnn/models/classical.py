"""The classical floor: colour and texture statistics per image, an RBF SVM on grouped folds.

A CNN trained on a few hundred images has to beat this to be worth its hours, so the study
trains and scores it on the same folds as the networks (and ``benchmarks/baseline_classical.py``
on the project's split). Each image is decoded at 1/``downscale`` of its size and described by
:data:`N_FEATURES` numbers: HSV and haematoxylin/eosin histograms and statistics (colour
deconvolution with the fixed Ruifrok matrix), grey-level co-occurrence statistics, rotation-
invariant local-binary-pattern histograms and gradient-magnitude statistics at two scales.

:class:`ColourTextureSVM` is ``StandardScaler + SVC(rbf, balanced)``: ``C`` and ``gamma`` are
chosen on folds of whole groups (patients), and probabilities are calibrated on the same folds,
so neither the choice nor a probability ever comes from an image whose group was in training.
Pure NumPy, SciPy, Pillow and scikit-learn: no Kedro, no TensorFlow.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy import ndimage
from sklearn.calibration import CalibratedClassifierCV
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from neuroblastoma_cnn.core.errors import DataError, ParameterError
from neuroblastoma_cnn.core.group_folds import Folds, stratified_group_folds
from neuroblastoma_cnn.images.decoding import ImageRejected, Reason, to_rgb8
from neuroblastoma_cnn.images.stain import HED_FROM_RGB, optical_density, tissue_od_mask

logger = logging.getLogger(__name__)

#: The benchmark's grid (README "classical floor"); the study may pass its own.
C_GRID = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
#: Multiples of 1 / n_features (sklearn's "scale" once features are standardised).
GAMMA_FACTORS = (0.03, 0.1, 0.3, 1.0, 3.0)
#: Numbers per image (see :func:`image_features`).
N_FEATURES = 101
#: Smallest side, in pixels after downscaling, that the texture statistics can be computed on.
MIN_SIDE = 8
CALIBRATIONS = ("sigmoid", "isotonic")



# ---------------------------------------------------------------------------------- features


def load_downscaled(path: Path, downscale: int) -> np.ndarray:
    """RGB uint8 at 1/``downscale`` of native size (JPEGs decode straight at reduced scale)."""
    with Image.open(path) as image:
        size = (max(1, image.width // downscale), max(1, image.height // downscale))
        image.draft("RGB", size)
        rgb = to_rgb8(image, str(path))
    if rgb.shape[1] != size[0] or rgb.shape[0] != size[1]:
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))
    return rgb


def _histogram(values: np.ndarray, bins: int, low: float, high: float) -> np.ndarray:
    counts, _ = np.histogram(values, bins=bins, range=(low, high))
    return counts / max(1, values.size)


def _hsv(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("HSV"), dtype=np.float64) / 255.0


def glcm_features(grey: np.ndarray, levels: int = 16, distances: tuple[int, ...] = (1, 2, 4)
                  ) -> list[float]:
    """Contrast, homogeneity, energy and correlation of the grey-level co-occurrence matrix,
    averaged over four directions, per distance (Haralick's classic texture statistics)."""
    q = np.minimum((grey * levels).astype(np.int64), levels - 1)
    i_idx, j_idx = np.indices((levels, levels))
    out: list[float] = []
    for d in distances:
        stats = []
        for dy, dx in ((0, d), (d, 0), (d, d), (d, -d)):  # dy >= 0: pairs (y, x), (y+dy, x+dx)
            height, width = q.shape
            a = q[: height - dy, max(0, -dx): width - max(0, dx)]
            b = q[dy:, max(0, dx): width - max(0, -dx)]
            glcm = np.bincount((a * levels + b).ravel(), minlength=levels**2).astype(float)
            glcm = glcm.reshape(levels, levels)
            glcm = glcm + glcm.T
            p = glcm / max(glcm.sum(), 1.0)
            mu = (i_idx * p).sum()
            var = ((i_idx - mu) ** 2 * p).sum()
            stats.append([
                ((i_idx - j_idx) ** 2 * p).sum(),
                (p / (1.0 + np.abs(i_idx - j_idx))).sum(),
                (p**2).sum(),
                ((i_idx - mu) * (j_idx - mu) * p).sum() / var if var > 1e-12 else 1.0,
            ])
        out.extend(np.mean(stats, axis=0).tolist())
    return out


def lbp_histogram(grey: np.ndarray, radius: int = 1) -> list[float]:
    """Rotation-invariant uniform LBP (8 neighbours at ``radius`` pixels): 10-bin histogram."""
    h, w = grey.shape
    r = radius
    centre = grey[r: h - r, r: w - r]
    offsets = ((-r, -r), (-r, 0), (-r, r), (0, r), (r, r), (r, 0), (r, -r), (0, -r))
    bits = np.stack([grey[r + dy: h - r + dy, r + dx: w - r + dx] >= centre
                     for dy, dx in offsets]).astype(np.int64)
    ones = bits.sum(axis=0)
    transitions = np.abs(np.diff(np.concatenate([bits, bits[:1]]), axis=0)).sum(axis=0)
    codes = np.where(transitions <= 2, ones, 9)
    return (np.bincount(codes.ravel(), minlength=10) / codes.size).tolist()


def gradient_features(grey: np.ndarray) -> list[float]:
    """Sobel gradient magnitude: mean, spread, median and 90th percentile (edge density)."""
    magnitude = np.hypot(ndimage.sobel(grey, axis=0), ndimage.sobel(grey, axis=1))
    return [magnitude.mean(), magnitude.std(), *np.percentile(magnitude, [50, 90])]


def colour_histograms(rgb: np.ndarray, bins: int = 16) -> list[float]:
    """Per-channel RGB histograms (``bins`` each) with each channel's mean and spread: the
    plain colour description simple floors use (stain intensity and tissue density)."""
    flat = rgb.reshape(-1, 3).astype(np.float64) / 255.0
    out: list[float] = []
    for channel in flat.T:
        out.extend(_histogram(channel, bins, 0, 1).tolist())
        out.extend([channel.mean(), channel.std()])
    return out


def feature_groups(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """The image's statistics by group (:data:`FEATURE_GROUPS`): what the selected floor
    switches on and off."""
    flat = rgb.reshape(-1, 3)
    od = optical_density(flat)
    tissue = tissue_od_mask(od)
    stains = od @ HED_FROM_RGB  # haematoxylin, eosin, (DAB) concentrations
    tissue_stains = stains[tissue] if tissue.sum() >= 10 else stains
    hsv = _hsv(rgb).reshape(-1, 3)
    grey = flat.astype(np.float64).mean(axis=1).reshape(rgb.shape[:2]) / 255.0
    haema = stains[:, 0].reshape(rgb.shape[:2])
    haema = np.clip(haema / max(np.percentile(haema, 99.5), 1e-6), 0.0, 1.0)
    half = grey[: grey.shape[0] // 2 * 2, : grey.shape[1] // 2 * 2]
    half = half.reshape(half.shape[0] // 2, 2, half.shape[1] // 2, 2).mean(axis=(1, 3))
    parts = {
        "colour": [[tissue.mean()], _histogram(hsv[:, 0], 18, 0, 1),
                   _histogram(hsv[:, 1], 8, 0, 1), _histogram(hsv[:, 2], 8, 0, 1)],
        "stain": [*[[s.mean(), s.std(), *np.percentile(s, [10, 50, 90])]
                    for s in tissue_stains[:, :2].T],
                  _histogram(tissue_stains[:, 0], 8, -0.2, 1.8)],
        "glcm": [glcm_features(grey), glcm_features(haema, distances=(1, 4))],
        "lbp": [lbp_histogram(grey, 1), lbp_histogram(grey, 2)],
        "gradient": [gradient_features(grey), gradient_features(half)],
        "rgb": [colour_histograms(rgb)],
    }
    return {name: np.concatenate([np.asarray(p, dtype=np.float64).ravel() for p in group])
            for name, group in parts.items()}


#: Feature groups and their sizes, in column order; the first five make :func:`image_features`.
FEATURE_GROUPS: dict[str, int] = {"colour": 35, "stain": 18, "glcm": 20, "lbp": 20,
                                  "gradient": 8, "rgb": 54}
#: The groups of :data:`N_FEATURES` (the floor's original description).
CORE_GROUPS = ("colour", "stain", "glcm", "lbp", "gradient")
N_ALL_FEATURES = sum(FEATURE_GROUPS.values())


def group_columns(groups: Sequence[str]) -> np.ndarray:
    """The column indices of ``groups`` in an :func:`all_features` row."""
    unknown = sorted(set(groups) - set(FEATURE_GROUPS))
    if unknown:
        raise ParameterError(f"Unknown feature group(s) {unknown}: known groups are "
                             f"{', '.join(FEATURE_GROUPS)}.")
    starts = np.cumsum([0, *FEATURE_GROUPS.values()])
    spans = {name: range(starts[i], starts[i + 1]) for i, name in enumerate(FEATURE_GROUPS)}
    return np.asarray([c for g in FEATURE_GROUPS if g in groups for c in spans[g]], dtype=int)


def all_features(rgb: np.ndarray) -> np.ndarray:
    """Every group of :data:`FEATURE_GROUPS`, :data:`N_ALL_FEATURES` numbers."""
    return np.concatenate(list(feature_groups(rgb).values()))


def image_features(rgb: np.ndarray) -> np.ndarray:
    """:data:`N_FEATURES` colour and texture numbers describing one (downscaled) image."""
    groups = feature_groups(rgb)
    return np.concatenate([groups[g] for g in CORE_GROUPS])


def _describe_one(path: Path, downscale: int, describe=image_features) -> np.ndarray:
    """One image's features, or :class:`ImageRejected` saying why it cannot be described."""
    try:
        rgb = load_downscaled(path, downscale)
    except ImageRejected:
        raise
    except UnidentifiedImageError as exc:
        raise ImageRejected(path, f"{Reason.NOT_AN_IMAGE}: {exc}") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        # Pillow reports truncated data as OSError, some corrupt headers as SyntaxError.
        raise ImageRejected(path, f"{Reason.CORRUPT}: {exc}") from exc
    if min(rgb.shape[:2]) < MIN_SIDE:
        raise ImageRejected(path, f"{Reason.TOO_SMALL}: {rgb.shape[1]}x{rgb.shape[0]} px at "
                            f"1/{downscale} scale, texture statistics need {MIN_SIDE} a side")
    features = describe(rgb)
    if not np.isfinite(features).all():  # a guard: every statistic above is bounded
        raise ImageRejected(path, "features are not finite")
    return features


def describe_images(paths: Sequence[Path], downscale: int, where: str | None = None,
                    every_group: bool = False) -> np.ndarray:
    """``(n_images, N_FEATURES)`` float64 features, one row per path, in order
    (``every_group``: ``(n_images, N_ALL_FEATURES)``, every group of :data:`FEATURE_GROUPS`).

    Images are read one at a time, so memory stays that of one downscaled image. A file that
    cannot be described raises :class:`DataError` (:class:`ImageRejected` without ``where``)
    naming it and the problem; ``where`` (e.g. "study fold 2") prefixes the message with the
    step that asked.
    """
    if int(downscale) < 1:
        raise ParameterError(f"downscale = {downscale}: must be >= 1.")
    describe = all_features if every_group else image_features
    rows = np.empty((len(paths), N_ALL_FEATURES if every_group else N_FEATURES))
    for i, path in enumerate(paths):
        try:
            rows[i] = _describe_one(Path(path), int(downscale), describe)
        except ImageRejected as exc:
            if not where:
                raise
            raise DataError(f"{where}: {exc}") from exc
    logger.debug("Described %d image(s) at 1/%d scale", len(paths), downscale)
    return rows


# ------------------------------------------------------------------------------------ folds


def grouped_folds(labels: Sequence[Any], groups: Sequence[Any], n_splits: int, seed: int = 0
                  ) -> Folds | None:
    """Folds of whole groups as ``(train_rows, test_rows)`` pairs, every class in each train.

    ``StratifiedGroupKFold(n_splits)``, shuffled with ``seed``. With fewer groups in some class
    than ``n_splits``, as many folds as that class allows (a fold whose training side lacks a
    class could neither score nor calibrate it), with a warning; ``None`` when not even 2 can.
    """
    labels = np.asarray([str(v) for v in labels])
    groups = np.asarray([str(g) for g in groups])
    fewest = min(len(np.unique(groups[labels == c])) for c in np.unique(labels))
    n = min(int(n_splits), fewest)
    if 2 <= n < n_splits:
        logger.warning("Classical floor: a class has only %d group(s); %d inner folds instead "
                       "of %d", fewest, n, n_splits)
    for k in range(n, 1, -1):
        folds = stratified_group_folds(labels, groups, k, seed)
        if all(len(np.unique(labels[train])) == len(np.unique(labels)) for train, _ in folds):
            if k < n:
                logger.warning("Classical floor: %d inner folds (with %d a class would be "
                               "missing from a fold's training groups)", k, k + 1)
            return folds
    logger.warning("Classical floor: too few groups per class for 2 grouped inner folds")
    return None


# ------------------------------------------------------------------------------------ model


class ColourTextureSVM:
    """``StandardScaler + SVC(rbf, balanced)`` with grouped model selection and calibration.

    ``fit(features, labels, groups)`` chooses ``C`` in ``c_grid`` and ``gamma = factor /
    n_features`` (``factor`` in ``gamma_factors``) by macro-F1 over :func:`grouped_folds`, then
    fits ``calibration`` probabilities on the same folds' out-of-fold decision values
    (``CalibratedClassifierCV(ensemble=False)``: one SVM on all rows, one calibrator). Labels are
    any strings; ``classes_`` is their sorted list and the column order of ``predict_proba``.
    """

    def __init__(self, c_grid: Sequence[float], gamma_factors: Sequence[float],
                 inner_folds: int, calibration: str = "sigmoid", seed: int = 0):
        if not c_grid or not gamma_factors or min(*c_grid, *gamma_factors) <= 0:
            raise ParameterError("Classical floor: c_grid and gamma_factors must be non-empty "
                                 f"lists of positive numbers (got {c_grid}, {gamma_factors}).")
        check_inner_folds("Classical floor", inner_folds, calibration)
        self.c_grid = [float(c) for c in c_grid]
        self.gamma_factors = [float(g) for g in gamma_factors]
        self.inner_folds = int(inner_folds)
        self.calibration = calibration
        self.seed = int(seed)

    def fit(self, features: np.ndarray, labels: Sequence[Any], groups: Sequence[Any]
            ) -> ColourTextureSVM:
        """Chooses C and gamma on grouped folds, then calibrates on the same folds."""
        x, y, groups = self._checked(features, labels, groups)
        self.classes_ = [str(c) for c in np.unique(y)]
        codes = np.searchsorted(self.classes_, y)
        self.n_features_in_ = x.shape[1]
        folds = grouped_folds(y, groups, self.inner_folds, self.seed)
        if folds is None:
            c, factor = _middle(self.c_grid), _middle(self.gamma_factors)
            self.cv_score_ = float("nan")
            # One "fold" that tests on its own training rows: probabilities fitted in-sample,
            # overconfident, but the only ones possible without two groups per class.
            folds = [(np.arange(len(y)), np.arange(len(y)))]
            logger.warning("Classical floor: no grouped folds; C=%g, gamma factor %g (middle "
                           "of the grid), in-sample probabilities", c, factor)
        else:
            c, factor, self.cv_score_ = self._search(x, codes, folds)
        self.best_params_ = {"C": c, "gamma_factor": factor, "gamma": factor / x.shape[1]}
        self.n_inner_folds_ = len(folds)
        self.model_ = CalibratedClassifierCV(self._pipeline(c, self.best_params_["gamma"]),
                                             method=self.calibration, cv=folds, ensemble=False)
        self.model_.fit(x, codes)
        logger.info("Classical floor: C=%g, gamma=%g/n_features, inner CV macro-F1 %.3f over "
                    "%d grouped fold(s)", c, factor, self.cv_score_, len(folds))
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Calibrated probabilities, one column per class of ``classes_``, rows summing to 1."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features_in_:
            raise DataError(f"Classical floor: expected (n, {self.n_features_in_}) features, "
                            f"got {x.shape}.")
        return np.asarray(self.model_.predict_proba(x), dtype=np.float64)

    def probabilities_over(self, features: np.ndarray, classes: Sequence[str]) -> np.ndarray:
        """:meth:`predict_proba` with one column per name of ``classes`` (which hold
        ``classes_``): a class the floor never saw in training gets probability 0."""
        prob = np.zeros((len(features), len(classes)))
        prob[:, [list(classes).index(c) for c in self.classes_]] = self.predict_proba(features)
        return prob

    def predict(self, features: np.ndarray) -> np.ndarray:
        """The most probable class name per row (as the CNNs' image predictions are made)."""
        return np.asarray(self.classes_, dtype=object)[self.predict_proba(features).argmax(1)]

    def _pipeline(self, c: float, gamma: float) -> Pipeline:
        return Pipeline([("scale", StandardScaler()),
                         ("svc", SVC(kernel="rbf", class_weight="balanced", C=c, gamma=gamma))])

    def _search(self, x: np.ndarray, codes: np.ndarray, folds: Folds
                ) -> tuple[float, float, float]:
        """(C, gamma factor, mean macro-F1) of the best grid point on the grouped folds."""
        d = x.shape[1]
        grid = {"svc__C": self.c_grid, "svc__gamma": [f / d for f in self.gamma_factors]}
        search = GridSearchCV(self._pipeline(1.0, 1.0 / d), grid, scoring="f1_macro", cv=folds,
                              n_jobs=1, refit=False, error_score="raise")
        search.fit(x, codes)
        best = search.best_params_
        factor = self.gamma_factors[grid["svc__gamma"].index(best["svc__gamma"])]
        return float(best["svc__C"]), factor, float(search.best_score_)

    @staticmethod
    def _checked(features: np.ndarray, labels: Sequence[Any], groups: Sequence[Any]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray([str(v) for v in labels])
        g = np.asarray([str(v) for v in groups])
        if x.ndim != 2 or not len(x) == len(y) == len(g):
            raise DataError(f"Classical floor: features {x.shape}, {len(y)} labels and "
                            f"{len(g)} groups do not describe the same rows.")
        if not np.isfinite(x).all():
            raise DataError("Classical floor: features contain NaN or infinite values.")
        if len(np.unique(y)) < 2:
            raise DataError(f"Classical floor: one class only ({sorted(set(y))}); need two.")
        return x, y, g


def check_inner_folds(who: str, inner_folds: int, calibration: str | None = None) -> None:
    """One line naming ``who`` when the inner folds or the calibration cannot work."""
    if int(inner_folds) < 2:
        raise ParameterError(f"{who}: inner_folds = {inner_folds}: must be >= 2.")
    if calibration is not None and calibration not in CALIBRATIONS:
        raise ParameterError(f"{who}: calibration = {calibration!r}: must be one of "
                             f"{', '.join(CALIBRATIONS)}.")


def _middle(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]
