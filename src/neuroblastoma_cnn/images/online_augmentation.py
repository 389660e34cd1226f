"""Online augmentation: fresh random transforms for every training batch, inside tf.data.

Offline augmentation (pipelines/augmentation) writes a fixed set of copies once; on small data
the network then sees the same pixels every epoch and memorises them. Here every batch is
transformed afresh, so no two epochs see the same images. Transforms (each off at strength 0):

- ``dihedral``: one of the eight exact symmetries of a square (flips, 90-degree rotations) per
  image (the four flips only, for non-square images). Tissue has no "up", and these permute
  pixels without interpolation.
- ``stain_jitter``: H&E variation (Tellez et al. 2018): per image, each stain's optical density
  is scaled by U(1-s, 1+s) and shifted by U(-s, s), in H&E(-DAB) space through the fixed
  Ruifrok matrix (``stain_space: hed``) or per RGB channel of optical density (``od``).
- ``brightness`` (added U(-b, b) of full scale), ``contrast`` (deviation from each channel's
  mean scaled by U(1-c, 1+c)), ``saturation`` (deviation from grey scaled by U(1-s, 1+s)).
- ``scale`` (zoom by U(1-s, 1+s) about the centre), ``translate`` (shift by up to that fraction
  of the side), ``crop`` (a random square of side U(1-c, 1) of the image, resized back): one
  bilinear affine warp per image for all three, with reflected borders.

Determinism: draws are *stateless*, from a seed derived from ``(seed, step)``, where ``step`` is
a global batch counter (:func:`augment_batches` numbers the batches of a repeated dataset, so
the counter keeps growing across epochs). One seed and one input order give identical batches on
every run, in parallel map calls; a later epoch gets other draws. Each transform draws from its
own sub-seed, so switching one off does not change what the others draw.

Speed: the work is a handful of vectorised ops on a whole float32 batch, mapped in parallel
ahead of the training step, so it costs little next to a ResNet step.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from neuroblastoma_cnn.core.errors import ParameterError
from neuroblastoma_cnn.images.stain import HED_FROM_RGB, RGB_FROM_HED

logger = logging.getLogger(__name__)

STAIN_SPACES = ("hed", "od")
N_DIHEDRAL = 8
# Sub-seed slots, one per transform: fixed so that toggling one transform leaves the others' draws.
_SLOTS = ("dihedral", "geometry", "stain", "brightness", "contrast", "saturation")

def _tf() -> Any:
    """TensorFlow, imported on first use: pipelines import this module when they are
    registered, and a command that trains nothing should not load TensorFlow."""
    import tensorflow as tf  # noqa: PLC0415  (lazy, see above)

    return tf



@dataclass(frozen=True)
class OnlineAugmentation:
    """Which transforms run and how strongly; a field at 0 / false is off.

    The absence of a key means "off", not a recommended value: the recipe's values live in
    ``conf/base/parameters_training.yml``.
    """

    enabled: bool = False
    dihedral: bool = False
    stain_jitter: float = 0.0
    stain_space: str = "hed"
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    scale: float = 0.0
    translate: float = 0.0
    crop: float = 0.0

    @classmethod
    def from_config(cls, config: Any) -> OnlineAugmentation:
        """From a mapping, a pydantic model (``model_dump``) or an instance; unknown keys fail."""
        if isinstance(config, cls):
            return config
        if config is None:
            return cls()
        if hasattr(config, "model_dump"):
            config = config.model_dump()
        if not isinstance(config, Mapping):
            raise ParameterError(f"online augmentation: expected a mapping, got {type(config)}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ParameterError(
                f"Unknown online augmentation parameter(s) {unknown}; known: {sorted(known)}."
            )
        out = cls(**config)
        checks = [
            (0 <= out.stain_jitter < 1, "stain_jitter must be in [0, 1)"),
            (out.stain_space in STAIN_SPACES, f"stain_space must be one of {STAIN_SPACES}"),
            (0 <= out.brightness <= 1, "brightness must be in [0, 1]"),
            (0 <= out.contrast < 1, "contrast must be in [0, 1)"),
            (0 <= out.saturation < 1, "saturation must be in [0, 1)"),
            (0 <= out.scale < 1, "scale must be in [0, 1)"),
            (0 <= out.translate < 0.5, "translate must be in [0, 0.5)"),
            (0 <= out.crop < 1, "crop must be in [0, 1)"),
        ]
        errors = [message for ok, message in checks if not ok]
        if errors:
            raise ParameterError(f"Bad online augmentation parameters: {'; '.join(errors)}.")
        return out

    @property
    def active(self) -> bool:
        """True when at least one transform would change an image."""
        return self.enabled and (
            self.dihedral or self.geometric
            or any((self.stain_jitter, self.brightness, self.contrast, self.saturation))
        )

    @property
    def geometric(self) -> bool:
        return bool(self.scale or self.translate or self.crop)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------ exact symmetries


def dihedral(images: Any, k: int) -> Any:
    """Symmetry ``k`` (0-7) of a batch ``[n, H, W, C]``: bit 2 transposes, bit 0 flips left-right,
    bit 1 flips up-down. 0 is the identity; the eight together are the dihedral group D4.

    Works on tf tensors and NumPy arrays (returned as a tensor); square images only for k >= 4.
    """
    tf = _tf()

    if not 0 <= int(k) < N_DIHEDRAL:
        raise ParameterError(f"Dihedral symmetry index must be 0-7, got {k}.")
    x = tf.convert_to_tensor(images)
    if k & 4:
        x = tf.transpose(x, [0, 2, 1, 3])
    if k & 1:
        x = tf.reverse(x, [2])
    if k & 2:
        x = tf.reverse(x, [1])
    return x


def _dihedral_permutations(height: int, width: int) -> np.ndarray:
    """Pixel index maps ``[k, H*W]`` of the symmetries a ``height x width`` image has."""
    index = np.arange(height * width, dtype=np.int32).reshape(1, height, width, 1)
    count = N_DIHEDRAL if height == width else 4
    return np.stack([dihedral_numpy(index, k).reshape(-1) for k in range(count)])


def _random_dihedral(x: Any, seed: Any) -> Any:
    """One random symmetry per image, as a single gather through precomputed index maps (a
    few times faster than computing every flip of the batch and selecting)."""
    tf = _tf()

    height, width, channels = x.shape[1], x.shape[2], x.shape[3]
    if None in (height, width, channels):
        raise ParameterError("Online dihedral augmentation needs batches of known image size.")
    maps = tf.constant(_dihedral_permutations(height, width))
    n = tf.shape(x)[0]
    k = tf.random.stateless_uniform([n], seed, 0, maps.shape[0], dtype=tf.int32)
    flat = tf.reshape(x, [n, height * width, channels])
    out = tf.gather(flat, tf.gather(maps, k), batch_dims=1)
    return tf.reshape(out, [n, height, width, channels])


# --------------------------------------------------------------------------------- geometry


def _random_affine(x: Any, seed: Any, cfg: OnlineAugmentation) -> Any:
    """Crop (zoom in on a random sub-square), then zoom about the centre and shift: one warp."""
    tf = _tf()

    shape = tf.shape(x)
    n = shape[0]
    height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    s_crop, s_scale, s_tx, s_ty, s_ox, s_oy = tf.unstack(
        tf.random.experimental.stateless_split(seed, 6)
    )

    def uniform(s: Any, low: float, high: float) -> Any:
        return tf.random.stateless_uniform([n], s, low, high)

    # Crop: output pixel p samples input f * p + offset, offset uniform over the valid range.
    f = uniform(s_crop, 1.0 - cfg.crop, 1.0) if cfg.crop else tf.ones([n])
    off_x = uniform(s_ox, 0.0, 1.0) * (1.0 - f) * (width - 1.0)
    off_y = uniform(s_oy, 0.0, 1.0) * (1.0 - f) * (height - 1.0)
    # Zoom by z about the centre c and shift by t: p -> (p - c) / z + c + t, before the crop map.
    z = uniform(s_scale, 1.0 - cfg.scale, 1.0 + cfg.scale) if cfg.scale else tf.ones([n])
    tx = uniform(s_tx, -cfg.translate, cfg.translate) * width if cfg.translate else tf.zeros([n])
    ty = uniform(s_ty, -cfg.translate, cfg.translate) * height if cfg.translate else tf.zeros([n])
    cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
    a = f / z
    a2 = f * (cx - cx / z + tx) + off_x
    b2 = f * (cy - cy / z + ty) + off_y
    zeros = tf.zeros([n])
    transforms = tf.stack([a, zeros, a2, zeros, a, b2, zeros, zeros], axis=1)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=x, transforms=transforms, output_shape=shape[1:3], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="REFLECT",
    )
    return tf.ensure_shape(out, x.shape)  # the op forgets the static shape; later ops need it


# ----------------------------------------------------------------------------------- colour


def _random_stain(x: Any, seed: Any, strength: float, space: str) -> Any:
    """Scale and shift each stain's optical density per image; one 3x3 map + offset per image."""
    tf = _tf()

    n = tf.shape(x)[0]
    s_alpha, s_beta = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    alpha = tf.random.stateless_uniform([n, 3], s_alpha, 1.0 - strength, 1.0 + strength)
    beta = tf.random.stateless_uniform([n, 3], s_beta, -strength, strength)
    od = -tf.math.log((x + 1.0) / 256.0)
    if space == "hed":
        to_hed = tf.constant(HED_FROM_RGB, tf.float32)
        to_rgb = tf.constant(RGB_FROM_HED, tf.float32)
        # od' = ((od @ to_hed) * alpha + beta) @ to_rgb = od @ M_i + beta @ to_rgb
        matrix = tf.einsum("cd,nd,de->nce", to_hed, alpha, to_rgb)
        offset = beta @ to_rgb
    else:
        matrix = tf.linalg.diag(alpha)
        offset = beta
    od = tf.einsum("nhwc,nce->nhwe", od, matrix) + offset[:, None, None, :]
    return 256.0 * tf.exp(-od) - 1.0


def _per_image(seed: Any, n: Any, low: float, high: float) -> Any:
    tf = _tf()

    return tf.reshape(tf.random.stateless_uniform([n], seed, low, high), [-1, 1, 1, 1])


# ---------------------------------------------------------------------------------- the map


class Augmenter:
    """``augmenter(images, labels, step) -> (images, labels)`` for float32 batches in [0, 255].

    ``step`` is the global batch number (any integer tensor); the same (seed, step, images)
    always give the same output. Labels pass through unchanged.
    """

    def __init__(self, config: Any, seed: int):
        self.config = OnlineAugmentation.from_config(config)
        self.seed = int(seed)

    def __call__(self, images: Any, labels: Any, step: Any = 0) -> tuple[Any, Any]:
        tf = _tf()

        cfg = self.config
        x = tf.cast(images, tf.float32)
        if not cfg.active:
            return x, labels
        base = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(step, tf.int64)])
        seeds = dict(zip(_SLOTS, tf.unstack(
            tf.random.experimental.stateless_split(base, len(_SLOTS))), strict=True))
        n = tf.shape(x)[0]
        if cfg.geometric:
            x = _random_affine(x, seeds["geometry"], cfg)
        if cfg.dihedral:
            x = _random_dihedral(x, seeds["dihedral"])
        if cfg.stain_jitter:
            x = _random_stain(x, seeds["stain"], cfg.stain_jitter, cfg.stain_space)
        if cfg.brightness:
            x = x + 255.0 * _per_image(seeds["brightness"], n, -cfg.brightness, cfg.brightness)
        if cfg.contrast:
            mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
            factor = _per_image(seeds["contrast"], n, 1.0 - cfg.contrast, 1.0 + cfg.contrast)
            x = (x - mean) * factor + mean
        if cfg.saturation:
            grey = tf.reduce_sum(x * tf.constant([0.299, 0.587, 0.114]), axis=-1, keepdims=True)
            factor = _per_image(seeds["saturation"], n, 1.0 - cfg.saturation,
                                1.0 + cfg.saturation)
            x = (x - grey) * factor + grey
        return tf.clip_by_value(x, 0.0, 255.0), labels


def make_augmenter(config: Any, seed: int) -> Augmenter:
    """The map function for batches: see :class:`Augmenter` and :func:`augment_batches`."""
    return Augmenter(config, seed)


def augment_batches(dataset: Any, augmenter: Augmenter) -> Any:
    """Numbers the batches of ``dataset`` (``(images, labels)``) and augments them in parallel.

    Give it the *repeated* (endless) training dataset and fit with ``steps_per_epoch``: the
    batch counter then runs across epochs, so each epoch draws new transforms. A dataset that is
    re-iterated every epoch would restart the counter and repeat the draws.
    """
    tf = _tf()

    if not augmenter.config.active:
        return dataset
    return dataset.enumerate().map(
        lambda step, batch: augmenter(batch[0], batch[1], step),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
    )


def dihedral_numpy(images: np.ndarray, k: int) -> np.ndarray:
    """NumPy twin of :func:`dihedral`, for checks and for code that has no TensorFlow graph."""
    x = np.asarray(images)
    if k & 4:
        x = np.swapaxes(x, 1, 2)
    if k & 1:
        x = x[:, :, ::-1]
    if k & 2:
        x = x[:, ::-1]
    return np.ascontiguousarray(x)
