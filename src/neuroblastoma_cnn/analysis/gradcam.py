"""Grad-CAM: where in an image the model found the evidence for a class.

Grad-CAM (Selvaraju et al. 2017) weights the channels of the last convolutional feature map by
the spatial mean of the class score's gradient, sums them and keeps the positive part. Here it
is computed per tile, because the models classify tiles: each tile's map is upsampled to the
tile's footprint and stitched back where the tile was cut, so one heatmap covers a whole image
of any size. Pixels no used tile covers have no heat (the model never looked there).

- The feature map is the output of the last rank-4 layer of the outer model: ``conv5_block3_out``
  in ResNet34, the nested ``resnet50`` backbone (its conv5 output) in the ResNet50 transfer model.
- The class score is the logit (pre-softmax) when the model ends in a softmax Dense layer, as both
  ResNets do, because the gradient of a saturated probability vanishes; otherwise the output.
- Only the head is differentiated (feature map -> score), so a map costs about one forward pass.
- A heatmap is normalised by its image-wide maximum, so tiles of one image are comparable.
- A fold ensemble (``models.ensemble``) has no feature map of its own: its tile map is the
  weighted mean (the ensemble's own weights) of its members' maps for the same class, so it
  shows where the averaged evidence lies; the members' feature maps must have one shape.

TensorFlow is imported lazily: the evaluation and predict pipelines import this module when they
are registered, and a `kedro` command that draws nothing should not load TensorFlow.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from PIL import Image

from neuroblastoma_cnn.images.decoding import Decoded, TilingConfig
from neuroblastoma_cnn.images.preprocessing import Preprocessing

logger = logging.getLogger(__name__)

#: Share of the heat colour in an overlay where the heat is 1.
DEFAULT_ALPHA = 0.5
#: Brightness of image areas no used tile covers (the model did not look there).
UNUSED_BRIGHTNESS = 0.6


def feature_tensor(model: Any) -> tuple[str, Any]:
    """Name and outer-graph tensor of the last convolutional feature map (last rank-4 output).

    A nested backbone's ``.output`` belongs to its own graph; the tensor of its call inside the
    outer model is the output of its inbound node there, which is what is returned.
    """
    for layer in reversed(model.layers):
        nodes = getattr(layer, "_inbound_nodes", None) or []
        if not nodes:
            continue
        outputs = nodes[-1].output_tensors
        if len(outputs) == 1 and len(outputs[0].shape) == 4:
            return layer.name, outputs[0]
    raise ValueError(
        f"Model '{model.name}' has no convolutional feature map (no rank-4 layer output): "
        "Grad-CAM needs one."
    )


class GradCam:
    """Grad-CAM maps of tiles for one model; build once, call per batch of tiles."""

    def __init__(self, model: Any, batch_size: int):
        import keras  # noqa: PLC0415  (lazy: pipelines import this module at registration)
        import tensorflow as tf  # noqa: PLC0415

        self.model = model
        self.batch_size = int(batch_size)
        self._members = _member_cams(model, self.batch_size)
        if self._members:
            self.layer_name = ", ".join(f"{cam.model.name}/{cam.layer_name}"
                                        for _, cam in self._members)
            return
        self.layer_name, features = feature_tensor(model)
        last = model.layers[-1]
        activation = getattr(getattr(last, "activation", None), "__name__", "")
        self._dense = last if hasattr(last, "kernel") and activation == "softmax" else None
        score = last.input if self._dense is not None else model.outputs[0]
        self._head = keras.Model(model.inputs[0], [features, score], name="gradcam")
        self._step = tf.function(self._maps, reduce_retracing=True)
        logger.debug("Grad-CAM on layer '%s' of '%s'", self.layer_name, model.name)

    def _maps(self, tiles: Any, class_index: Any) -> Any:
        import tensorflow as tf  # noqa: PLC0415  (lazy, as above)

        with tf.GradientTape() as tape:
            features, score = self._head(tiles, training=False)
            if self._dense is not None:
                score = tf.matmul(score, self._dense.kernel) + self._dense.bias
            # Samples are independent (inference mode), so one summed score gives every
            # sample's own gradient.
            total = tf.reduce_sum(tf.gather(score, class_index, axis=1))
        grads = tape.gradient(total, features)
        weights = tf.reduce_mean(grads, axis=(1, 2))
        return tf.nn.relu(tf.einsum("nhwk,nk->nhw", features, weights))

    def tile_maps(self, tiles: np.ndarray, class_index: int) -> np.ndarray:
        """Raw (unnormalised, >= 0) Grad-CAM maps ``(n, h, w)`` of uint8 or float tiles."""
        n_classes = int(self.model.outputs[0].shape[-1])
        if not 0 <= int(class_index) < n_classes:
            raise ValueError(f"class_index {class_index} outside 0..{n_classes - 1}")
        tiles = np.asarray(tiles)
        if tiles.ndim != 4 or len(tiles) == 0:
            raise ValueError(f"Expected a non-empty batch of tiles [n, H, W, 3], got {tiles.shape}")
        if self._members:
            return _weighted_sum(self._members, tiles, int(class_index))
        out = []
        for start in range(0, len(tiles), self.batch_size):
            batch = tiles[start : start + self.batch_size].astype(np.float32)
            out.append(np.asarray(self._step(batch, np.int32(class_index))))
        return np.concatenate(out).astype(np.float32)


def _member_cams(model: Any, batch_size: int) -> list[tuple[float, GradCam]]:
    """``(weight, Grad-CAM)`` of each member of an ensemble; [] for a single network."""
    from neuroblastoma_cnn.models import ensemble  # noqa: PLC0415  (lazy: Keras)

    if not ensemble.is_ensemble(model):
        return []
    members = ensemble.ensemble_members(model)
    cams = [(w, GradCam(m, batch_size)) for w, m in
            zip(ensemble.ensemble_weights(model), members, strict=True)]
    logger.debug("Grad-CAM of ensemble '%s': weighted mean over %d members", model.name,
                 len(cams))
    return cams


def _weighted_sum(members: Sequence[tuple[float, GradCam]], tiles: np.ndarray,
                  class_index: int) -> np.ndarray:
    """The members' maps of the same tiles and class, weighted (weights sum to 1)."""
    maps = [(np.float32(weight), cam.tile_maps(tiles, class_index)) for weight, cam in members]
    shapes = {m.shape for _, m in maps}
    if len(shapes) > 1:
        raise ValueError(f"Ensemble members' Grad-CAM maps differ in shape {sorted(shapes)}: "
                         "they cannot be averaged.")
    return np.sum([weight * m for weight, m in maps], axis=0).astype(np.float32)


def stitch(
    maps: np.ndarray,
    positions: Sequence[tuple[int, int]],
    footprint: tuple[int, int],
    shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Places tile maps back where the tiles were cut; returns ``(heat, covered)``.

    ``footprint`` is a tile's ``(width, height)`` in the target image, ``positions`` the tiles'
    top-left corners there and ``shape`` the target ``(height, width)``. Each map is upsampled
    bilinearly to the footprint; overlapping tiles are averaged. ``heat`` is in [0, 1]
    (divided by its maximum); ``covered`` marks pixels under at least one tile.
    """
    height, width = int(shape[0]), int(shape[1])
    tile_w, tile_h = int(footprint[0]), int(footprint[1])
    total = np.zeros((height, width), dtype=np.float32)
    count = np.zeros((height, width), dtype=np.float32)
    for cam, (x, y) in zip(maps, positions, strict=True):
        x0, y0 = max(int(x), 0), max(int(y), 0)
        x1, y1 = min(int(x) + tile_w, width), min(int(y) + tile_h, height)
        if x1 <= x0 or y1 <= y0:
            continue
        up = np.asarray(
            Image.fromarray(np.asarray(cam, dtype=np.float32), mode="F").resize(
                (tile_w, tile_h), Image.Resampling.BILINEAR
            )
        )
        total[y0:y1, x0:x1] += up[y0 - int(y) : y1 - int(y), x0 - int(x) : x1 - int(x)]
        count[y0:y1, x0:x1] += 1
    covered = count > 0
    heat = np.divide(total, count, out=np.zeros_like(total), where=covered)
    heat = np.clip(heat, 0.0, None)
    peak = float(heat.max()) if heat.size else 0.0
    if peak > 0:
        heat /= peak
    return np.clip(heat, 0.0, 1.0), covered


def overlay(
    rgb: np.ndarray,
    heat: np.ndarray,
    covered: np.ndarray | None = None,
    alpha: float = DEFAULT_ALPHA,
    colormap: str = "jet",
) -> np.ndarray:
    """The image with the heatmap blended in (more colour where hotter), uint8 ``[H, W, 3]``.

    Areas outside ``covered`` are dimmed and get no colour: no tile there was classified.
    """
    if heat.shape != rgb.shape[:2]:
        raise ValueError(f"Heatmap {heat.shape} does not match the image {rgb.shape[:2]}")
    colours = colormaps[colormap](np.clip(heat, 0, 1))[..., :3].astype(np.float32) * 255
    weight = (float(alpha) * (0.35 + 0.65 * np.clip(heat, 0, 1)))[..., None]
    image = rgb.astype(np.float32)
    if covered is not None:
        weight = weight * covered[..., None]
        image = np.where(covered[..., None], image, image * UNUSED_BRIGHTNESS)
    out = image * (1 - weight) + colours * weight
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------- whole images


def image_gradcam(
    cam: GradCam,
    image: np.ndarray | Decoded,
    tiling: TilingConfig,
    class_index: int,
    fallback_tiles: int,
    scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM heatmap of a class over a whole image: ``(heat in [0, 1], covered)`` of shape
    ``(round(H * scale), round(W * scale))`` (``H, W`` native), built from the tiles a
    prediction uses (``image`` decoded as :meth:`ImageChecks.decode_for` decodes it)."""
    decoded = tiling.at_scale(image)
    tiles, _ = tiling.tiles_or_fallback(decoded, fallback_tiles)
    height, width = decoded.height, decoded.width
    tile_w, tile_h = tiling.footprint(width, height)
    shape = (max(1, round(height * scale)), max(1, round(width * scale)))
    return stitch(
        cam.tile_maps(np.stack([t.tile for t in tiles]), class_index),
        [(round(t.x * scale), round(t.y * scale)) for t in tiles],
        (max(1, round(tile_w * scale)), max(1, round(tile_h * scale))),
        shape,
    )


def store_image_overlay(
    cam: GradCam, tiles: Any, image_path: str, class_index: int, alpha: float = DEFAULT_ALPHA
) -> np.ndarray:
    """Grad-CAM overlay of one image rebuilt from its tiles in a tile store (at tile resolution).

    Cheap: no raw image is decoded; the picture is exactly what the model saw.
    """
    rows = tiles.index[tiles.index["image_path"].astype(str) == str(image_path)]
    if rows.empty:
        raise ValueError(f"No tile of '{image_path}' in the tile store.")
    pixels = tiles.get(rows["tile_id"].tolist())
    size = pixels.shape[1]
    tile_size = Preprocessing.from_store(tiles).tiling.tile_size
    scale = size / float(tile_size) if tile_size else 1.0
    positions = [(round(x * scale), round(y * scale))
                 for x, y in zip(rows["x"], rows["y"], strict=True)]
    width = max(x for x, _ in positions) + size
    height = max(y for _, y in positions) + size
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    for tile, (x, y) in zip(pixels, positions, strict=True):
        canvas[y : y + size, x : x + size] = tile
    heat, covered = stitch(cam.tile_maps(pixels, class_index), positions, (size, size),
                           (height, width))
    return overlay(canvas, heat, covered, alpha=alpha)
