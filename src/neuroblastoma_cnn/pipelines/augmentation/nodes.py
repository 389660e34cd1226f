"""Balances the training split by class with random geometric (and optional colour) augmentation.

The study grew every class of its training set to 600 images with random rotation (up to 50
degrees), width/height shifts (0.2), horizontal flips and reflect fill. This module does the same
with Keras 3 preprocessing layers (the study's ``ImageDataGenerator`` is gone from Keras 3), plus
options common in histology that are off by default: vertical flips, 90-degree rotations, H&E
stain jitter and brightness/contrast jitter.

Only tiles of the ``train`` split are read; validation and test tiles are never touched, so they
stay an honest measure of the model. Classes at or above the target keep all their originals and
get no copies (nothing is cut). Copies are made round-robin over a seeded shuffle of a class's
originals, so every original is used ``floor`` or ``ceil`` of (copies / originals) times.

Determinism: every random draw comes from the seed (Keras layers get fixed seeds and run on the
CPU, the colour jitter uses a seeded numpy generator), and tiles go through the layers in a fixed
order and batch size, so one seed and one input give byte-identical stores. The batch size is
part of the recipe: changing it changes which random numbers a tile gets.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from neuroblastoma_cnn.core.errors import DataError
from neuroblastoma_cnn.datasets import TileStore, TileStream
from neuroblastoma_cnn.images.preprocessing import RECORD_KEYS
from neuroblastoma_cnn.images.stain import HED_FROM_RGB, RGB_FROM_HED
from neuroblastoma_cnn.params import AugmentationParams

logger = logging.getLogger(__name__)

def training_rows(tiles: TileStore, split_table: pd.DataFrame) -> pd.DataFrame:
    """The training split's tiles, checked against the store they will be read from.

    A split table made from another ``tiles`` version would silently pair wrong pixels with
    labels, so ids, classes, groups and images must all match the store's index.
    """
    needed = ("tile_id", "image_path", "label", "group", "split")
    missing = [c for c in needed if c not in split_table.columns]
    if missing:
        raise DataError(f"The split table lacks column(s) {missing}.")
    train = split_table.loc[split_table["split"] == "train", list(needed[:4])].copy()
    if train.empty:
        raise DataError("The split table has no 'train' rows: nothing to augment.")
    train["tile_id"] = train["tile_id"].astype(int)
    index = tiles.index.set_index("tile_id")
    unknown = sorted(set(train["tile_id"]) - set(index.index))
    if unknown:
        raise DataError(
            f"The split table does not belong to tile store '{tiles.path}': {len(unknown)} "
            f"training tile id(s) are not in it (e.g. {unknown[:5]}). Split the same `tiles` "
            "version you augment (kedro run --load-versions=tiles:<version>)."
        )
    for col in ("image_path", "label", "group"):
        train[col] = train[col].astype(str)
        stored = index.loc[train["tile_id"], col].astype(str).to_numpy()
        differ = train["tile_id"].to_numpy()[stored != train[col].to_numpy()]
        if len(differ):
            raise DataError(
                f"The split table does not belong to tile store '{tiles.path}': column '{col}' "
                f"differs for {len(differ)} tile(s) (e.g. tile_id {differ[:5].tolist()}). Split "
                "the same `tiles` version you augment (kedro run --load-versions=tiles:<version>)."
            )
    return train.sort_values("tile_id").reset_index(drop=True)


def plan_copies(train: pd.DataFrame, classes: list[str], target: int, seed: int) -> pd.DataFrame:
    """One row per augmented copy to make (label, source_tile_id, group, image_path).

    Round-robin over a seeded shuffle of each class's originals: every original is used evenly,
    and when fewer copies than originals are needed the ones used are a random subset.
    """
    rng = np.random.default_rng([seed, 0])
    plans = []
    for label in classes:
        sources = train[train["label"] == label]
        if sources.empty:
            raise DataError(
                f"Class '{label}' has no tiles in the training split, so it cannot be balanced. "
                "Check the split summary; every class needs training data."
            )
        n_copies = max(0, target - len(sources))
        order = sources.iloc[rng.permutation(len(sources))]
        picks = order.iloc[np.arange(n_copies) % len(sources)]
        plans.append(picks.rename(columns={"tile_id": "source_tile_id"}))
    plan = pd.concat(plans, ignore_index=True)
    return plan.loc[:, ["label", "source_tile_id", "group", "image_path"]]


class TileAugmenter:
    """Applies the configured random transforms to uint8 batches ``[n, H, W, 3]``.

    A fresh instance replays the same random sequence, which is how a stream that is iterated
    twice writes the same bytes twice.
    """

    def __init__(self, params: AugmentationParams, tile_shape: tuple[int, ...]):
        # Lazy: the pipelines import this module when registered; TensorFlow loads only when
        # copies are made (a store already at its targets never needs it).
        import keras  # noqa: PLC0415
        import tensorflow as tf  # noqa: PLC0415

        if params.rotate90 and tile_shape[0] != tile_shape[1]:
            raise DataError(
                f"rotate90 needs square tiles; these are {tile_shape[0]}x{tile_shape[1]}."
            )
        self._tf = tf
        self._params = params
        self._rng = np.random.default_rng([params.seed, 1])
        seed = params.seed
        flip = {
            (True, True): "horizontal_and_vertical",
            (True, False): "horizontal",
            (False, True): "vertical",
            (False, False): None,
        }[(params.horizontal_flip, params.vertical_flip)]
        # Pinned to the CPU: its image ops are deterministic, a GPU's need not be.
        with tf.device("/CPU:0"):
            self._layers = []
            if params.rotation_degrees:
                self._layers.append(
                    keras.layers.RandomRotation(
                        params.rotation_degrees / 360.0, fill_mode=params.fill_mode, seed=seed
                    )
                )
            if params.width_shift or params.height_shift:
                self._layers.append(
                    keras.layers.RandomTranslation(
                        params.height_shift,
                        params.width_shift,
                        fill_mode=params.fill_mode,
                        seed=seed + 1,
                    )
                )
            if flip:
                self._layers.append(keras.layers.RandomFlip(flip, seed=seed + 2))

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        p, rng = self._params, self._rng
        batch = np.asarray(tiles)
        if p.rotate90:
            turns = rng.integers(0, 4, size=len(batch))
            batch = np.stack([np.rot90(t, k) for t, k in zip(batch, turns, strict=True)])
        x = batch.astype(np.float32)
        if self._layers:
            with self._tf.device("/CPU:0"):
                y = self._tf.convert_to_tensor(x)
                for layer in self._layers:
                    y = layer(y, training=True)
                x = np.asarray(y, dtype=np.float32)
        if p.stain_jitter:
            x = stain_jitter(x, rng, p.stain_jitter)
        n = len(x)
        if p.brightness:
            x = x + rng.uniform(-p.brightness, p.brightness, (n, 1, 1, 1)) * 255.0
        if p.contrast:
            mean = x.mean(axis=(1, 2), keepdims=True)
            x = (x - mean) * rng.uniform(1 - p.contrast, 1 + p.contrast, (n, 1, 1, 1)) + mean
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def stain_jitter(x: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """H&E jitter (Tellez et al.): per tile, each stain's optical density is scaled by
    U(1-s, 1+s) and shifted by U(-s, s), in HED space via the fixed Ruifrok matrix.

    Works on float RGB in [0, 255]; with scale 1 and shift 0 it returns its input (up to
    float error), since nothing is clipped between the two conversions.
    """
    n = len(x)
    od = -np.log(np.maximum(x, 1.0) / 255.0)
    hed = np.einsum("nhwc,cd->nhwd", od, HED_FROM_RGB.astype(np.float32))
    alpha = rng.uniform(1 - strength, 1 + strength, (n, 1, 1, 3)).astype(np.float32)
    beta = rng.uniform(-strength, strength, (n, 1, 1, 3)).astype(np.float32)
    od = np.einsum("nhwd,dc->nhwc", hed * alpha + beta, RGB_FROM_HED.astype(np.float32))
    return (255.0 * np.exp(-od)).astype(np.float32)


def augment_training_set(
    tiles: TileStore, split_table: pd.DataFrame, params: AugmentationParams
) -> TileStream:
    """The training split's originals, then augmented copies, until each class has the target.

    Returns a lazy stream: tiles are read and augmented ``batch_size`` at a time while the store
    is written, so memory does not grow with the data set.
    """
    p = params
    train = training_rows(tiles, split_table)
    classes = [str(c) for c in tiles.metadata.get("classes") or sorted(train["label"].unique())]
    extra = sorted(set(train["label"]) - set(classes))
    if extra:
        raise DataError(
            f"Training tiles have class(es) {extra} missing from the store's "
            f"classes {classes} ('{tiles.path}')."
        )
    plan = plan_copies(train, classes, p.target_per_class, p.seed)
    counts = _class_counts(train, plan, classes, p.target_per_class)
    source_meta = tiles.producer_metadata
    metadata = {
        "classes": classes,
        "augmentation": p.model_dump(mode="json"),
        "class_counts": counts,
        "source_store": str(tiles.path),
        "source_metadata": source_meta,
        # the source's preprocessing record, so the augmented store describes its tiles too
        **{k: v for k, v in source_meta.items() if k in RECORD_KEYS and k != "classes"},
    }
    tile_shape = tiles.tile_shape

    def records() -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        for start in range(0, len(train), p.batch_size):
            chunk = train.iloc[start : start + p.batch_size]
            for tile, row in zip(
                tiles.get(chunk["tile_id"]), chunk.itertuples(index=False), strict=True
            ):
                yield tile, _record(row.label, row.group, row.image_path, row.tile_id, False)
        if plan.empty:
            return  # every class at or above the target: no need to load TensorFlow
        augmenter = TileAugmenter(p, tile_shape)  # fresh per pass: replays the same draws
        for start in range(0, len(plan), p.batch_size):
            chunk = plan.iloc[start : start + p.batch_size]
            out = augmenter(tiles.get(chunk["source_tile_id"]))
            for tile, row in zip(out, chunk.itertuples(index=False), strict=True):
                yield tile, _record(row.label, row.group, row.image_path, row.source_tile_id, True)

    return TileStream(records, metadata)


def _class_counts(train: pd.DataFrame, plan: pd.DataFrame, classes: list[str],
                  target_per_class: int) -> dict[str, dict[str, int]]:
    """``{class: {"original": n, "augmented": m}}`` of the augmented store, each logged."""
    originals, copies = train["label"].value_counts(), plan["label"].value_counts()
    counts = {
        c: {"original": int(originals.get(c, 0)), "augmented": int(copies.get(c, 0))}
        for c in classes
    }
    for c, n in counts.items():
        logger.info(
            "Class '%s': %d training originals + %d augmented copies%s",
            c,
            n["original"],
            n["augmented"],
            " (above target: kept whole)" if n["original"] > target_per_class else "",
        )
    return counts


def _record(
    label: str, group: str, image_path: str, source: int, augmented: bool
) -> dict[str, Any]:
    return {
        "label": label,
        "group": group,
        "image_path": image_path,
        "source_tile_id": int(source),
        "augmented": augmented,
    }


def plot_augmentation_grid(augmented: TileStore, params: AugmentationParams) -> Figure:
    """One row per class: pairs of (original, one of its augmented copies), for a visual check
    that the transforms look like tissue and not artefacts. Classes with no copies (at or above
    the target) show originals next to empty panels."""
    p = params
    index = augmented.index
    labels = index["label"].astype(str)
    classes = [str(c) for c in augmented.metadata.get("classes") or sorted(labels.unique())]
    n = p.grid_samples_per_class
    fig = Figure(figsize=(1.6 * 2 * n, 1.7 * len(classes) + 0.4), layout="constrained")
    axes = fig.subplots(len(classes), 2 * n, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    is_aug = index["augmented"].astype(str).str.lower() == "true"
    for r, label in enumerate(classes):
        copies = index[is_aug & (labels == label)].drop_duplicates("source_tile_id")
        originals = index[~is_aug & (labels == label)].set_index("source_tile_id")
        if len(copies):
            picks = copies.iloc[np.linspace(0, len(copies) - 1, min(n, len(copies))).astype(int)]
            pairs = [
                (int(originals.loc[s, "tile_id"]), int(t))
                for s, t in zip(picks["source_tile_id"], picks["tile_id"], strict=True)
            ]
        else:
            pairs = [(int(t), None) for t in originals["tile_id"].iloc[:n]]
        ids = [i for pair in pairs for i in pair if i is not None]
        pixels = dict(zip(ids, augmented.get(ids), strict=True)) if ids else {}
        for j, (orig, copy) in enumerate(pairs):
            axes[r, 2 * j].imshow(pixels[orig])
            if copy is not None:
                axes[r, 2 * j + 1].imshow(pixels[copy])
            else:
                axes[r, 2 * j + 1].text(
                    0.5,
                    0.5,
                    "not\naugmented",
                    ha="center",
                    va="center",
                    fontsize=7,
                    transform=axes[r, 2 * j + 1].transAxes,
                )
        axes[r, 0].set_ylabel(label, fontsize=9)
    for j in range(n):
        axes[0, 2 * j].set_title("original", fontsize=8)
        axes[0, 2 * j + 1].set_title("augmented", fontsize=8)
    fig.suptitle(
        f"Augmentation samples (target {p.target_per_class} per class, seed {p.seed})", fontsize=10
    )
    return fig
