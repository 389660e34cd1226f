"""A training run in its own process, for the resume and multi-worker tests (not collected).

``python _train_child.py STORES OUT BACKUP_ROOT OVERRIDES_JSON [SLOW_SECONDS]`` trains
:func:`tiny_cnn` with ``train_model`` on the stores written by :func:`write_stores` into STORES,
saves the final weights to OUT (``.npz``) and, on the cluster's chief, the model next to it
(``.keras``). SLOW_SECONDS sleeps after each batch so that a test can kill it mid-epoch.
``TF_CONFIG`` (multi-worker) comes from the environment.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]  # this folder and tests/ (for _params)

CLASSES = ["alpha", "beta", "gamma"]
#: Small enough for seconds a run, but every mechanism on: dropout (random state), balanced
#: sampling, online augmentation (see :func:`train`), a warm-up + cosine schedule, label
#: smoothing, a monitor window.
RECIPE = {
    "optimizer": "adamw", "learning_rate": 0.05, "weight_decay": 0.01, "epochs": 4,
    "batch_size": 8, "seed": 5, "steps_per_epoch": 3, "sampling": "balanced",
    "schedule": {"type": "warmup_cosine", "warmup_epochs": 1}, "label_smoothing": 0.1,
    "monitor": "val_loss", "monitor_window": 2,
}


def tiny_cnn(architecture: str, input_size: int, num_classes: int, seed: int | None = None,
             **_: object):
    """A conv layer, dropout (whose random state a resumed run must restore) and a softmax."""
    import keras  # noqa: PLC0415  (TF_CONFIG must be set before TensorFlow loads)

    init = keras.initializers.GlorotUniform(seed)
    inputs = keras.Input((input_size, input_size, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, kernel_initializer=init)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.3, seed=seed)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", kernel_initializer=init)(x)
    return keras.Model(inputs, outputs, name=architecture)


def write_stores(folder: Path, size: int = 32) -> None:
    """Training tiles (imbalanced) and tiles with validation rows, coloured by class."""
    from _params import store_metadata  # noqa: PLC0415

    from neuroblastoma_cnn.datasets import write_tile_store  # noqa: PLC0415

    def records(counts: dict[str, int], seed: int):
        rng = np.random.default_rng(seed)
        for c, name in enumerate(CLASSES):
            for i in range(counts[name]):
                base = np.array([200 - 40 * c, 120, 160 + 20 * c])
                tile = rng.normal(base, 25, (size, size, 3)).clip(0, 255).astype(np.uint8)
                yield tile, {"label": name, "group": f"{name}-{i // 2}",
                             "image_path": f"{name}/{i // 2}.png"}

    meta = store_metadata(CLASSES, size)
    tiles = write_tile_store(folder / "tiles", records(dict.fromkeys(CLASSES, 6), 1), meta)
    split = tiles.index[["tile_id", "image_path", "label", "group"]].copy()
    split["split"] = np.where(split.groupby("label").cumcount() < 4, "validation", "test")
    split["fold"] = -1
    split.to_csv(folder / "split.csv", index=False)
    write_tile_store(folder / "train", records({"alpha": 12, "beta": 6, "gamma": 4}, 2), meta)


def train(stores: Path, overrides: dict, backup_root: Path, callbacks=()):
    """``train_model`` on the stores with the recipe and ``overrides``; online augmentation
    is on unless ``overrides["online_augmentation"]`` is False."""
    overrides = dict(overrides)
    from _params import params  # noqa: PLC0415

    from neuroblastoma_cnn.datasets.tile_store import TileStore  # noqa: PLC0415
    from neuroblastoma_cnn.pipelines.training import nodes  # noqa: PLC0415

    split = pd.read_csv(stores / "split.csv")
    augment = {**params("resnet34.training").online_augmentation.model_dump(),
               "enabled": overrides.pop("online_augmentation", True)}
    training = params("resnet34.training",
                      **{**RECIPE, "online_augmentation": augment, **overrides})
    return nodes.train_model(TileStore(stores / "train"), TileStore(stores / "tiles"), split,
                             params("resnet34.model"), training, build=tiny_cnn,
                             callbacks=callbacks, backup_root=backup_root)


def main() -> None:
    stores, out, backup_root = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    overrides = json.loads(sys.argv[4])
    slow = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    logging.basicConfig(level=logging.INFO)
    import keras  # noqa: PLC0415

    from neuroblastoma_cnn.runtime import distribution  # noqa: PLC0415

    class Slow(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            time.sleep(slow)

    model, history = train(stores, overrides, backup_root, [Slow()] if slow else [])
    np.savez(out, *model.get_weights())
    history.drop(columns="seconds").to_csv(out.with_suffix(".csv"), index=False)
    if distribution.is_chief():
        model.save(out.with_suffix(".keras"))


if __name__ == "__main__":
    main()
