"""Unit tests of the augmentation nodes on small synthetic tile stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _params import params as typed
from _params import store_metadata

from neuroblastoma_cnn.core.errors import ParameterError
from neuroblastoma_cnn.datasets import TileStore, write_tile_store
from neuroblastoma_cnn.images.preprocessing import Preprocessing
from neuroblastoma_cnn.pipelines.augmentation import create_pipeline
from neuroblastoma_cnn.pipelines.augmentation.nodes import (
    TileAugmenter,
    augment_training_set,
    plan_copies,
    plot_augmentation_grid,
    stain_jitter,
)

SIZE = 16
TARGET = 12
# Training originals per class: 'big' is above the target and must be kept whole.
TRAIN_COUNTS = {"big": 15, "mid": 5, "small": 3}
SETTINGS = {"target_per_class": TARGET, "seed": 3, "batch_size": 8, "grid_samples_per_class": 2}
PARAMS = typed("augmentation", **SETTINGS)


def ap(**overrides: object) -> object:
    """The test's augmentation parameters with ``overrides``, validated."""
    return typed("augmentation", **{**SETTINGS, **overrides})


def make_store_and_split(path: Path) -> tuple[TileStore, pd.DataFrame]:
    """Per class: its training tiles plus 2 validation and 2 test tiles, each tile its own image.

    Validation and test pixels are all 255 and training pixels stay below 250, so any held-out
    pixel reaching the output would be visible.
    """
    rng = np.random.default_rng(0)
    records, splits = [], []
    for label, n_train in TRAIN_COUNTS.items():
        for i, split in enumerate(["train"] * n_train + ["validation"] * 2 + ["test"] * 2):
            tile = (
                np.full((SIZE, SIZE, 3), 255, np.uint8)
                if split != "train"
                else rng.integers(0, 250, (SIZE, SIZE, 3), dtype=np.uint8)
            )
            group = f"{label}-{split}-{i % 2}"
            records.append(
                (tile, {"image_path": f"{label}/{group}/{i}.png", "label": label, "group": group})
            )
            splits.append(split)
    store = write_tile_store(path, records, store_metadata(sorted(TRAIN_COUNTS), SIZE),
                             shard_size=10)
    table = store.index[["tile_id", "image_path", "label", "group"]].copy()
    table["split"] = splits
    table["fold"] = [-1 if s == "test" else 0 for s in splits]
    return store, table


@pytest.fixture
def store_and_split(tmp_path: Path) -> tuple[TileStore, pd.DataFrame]:
    return make_store_and_split(tmp_path / "tiles")


def write(stream, path: Path) -> TileStore:
    return write_tile_store(path, stream, stream.metadata, shard_size=16)


def store_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_every_class_is_balanced_and_a_class_above_target_is_not_cut(
    store_and_split: tuple[TileStore, pd.DataFrame], tmp_path: Path
) -> None:
    store, table = store_and_split
    out = write(augment_training_set(store, table, PARAMS), tmp_path / "aug")
    counts = out.index.groupby(["label", "augmented"]).size().unstack(fill_value=0)
    assert counts.sum(axis=1).to_dict() == {"big": 15, "mid": TARGET, "small": TARGET}
    assert counts[False].to_dict() == TRAIN_COUNTS
    assert counts.loc["big", True] == 0
    assert out.metadata["classes"] == ["big", "mid", "small"]
    assert out.metadata["augmentation"]["target_per_class"] == TARGET
    assert out.metadata["class_counts"]["small"] == {"original": 3, "augmented": 9}
    # the augmented store carries the source store's preprocessing record
    assert Preprocessing.from_store(out) == Preprocessing.from_store(store)
    assert Preprocessing.from_store(out).input_size == SIZE
    assert list(out.index.columns) == [
        "tile_id",
        "shard",
        "offset",
        "label",
        "group",
        "image_path",
        "source_tile_id",
        "augmented",
    ]


def test_originals_are_copied_unchanged_and_copies_are_altered(
    store_and_split: tuple[TileStore, pd.DataFrame], tmp_path: Path
) -> None:
    store, table = store_and_split
    out = write(augment_training_set(store, table, PARAMS), tmp_path / "aug")
    originals = out.index[~out.index["augmented"]]
    np.testing.assert_array_equal(
        out.get(originals["tile_id"]), store.get(originals["source_tile_id"])
    )
    copies = out.index[out.index["augmented"]]
    changed = out.get(copies["tile_id"]) != store.get(copies["source_tile_id"])
    assert changed.any(axis=(1, 2, 3)).all()
    # Copies carry their source's metadata.
    src = store.rows(copies["source_tile_id"])
    assert copies["group"].tolist() == src["group"].tolist()
    assert copies["image_path"].tolist() == src["image_path"].tolist()


def test_validation_and_test_tiles_are_never_read_or_written(
    store_and_split: tuple[TileStore, pd.DataFrame],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, table = store_and_split
    requested: list[int] = []
    real_get = store.get

    def spy(tile_ids):
        ids = list(tile_ids)
        assert len(ids) <= PARAMS.batch_size  # memory stays bounded by one batch
        requested.extend(ids)
        return real_get(ids)

    monkeypatch.setattr(store, "get", spy)
    out = write(augment_training_set(store, table, PARAMS), tmp_path / "aug")
    train_ids = set(table.loc[table["split"] == "train", "tile_id"])
    assert requested and set(requested) <= train_ids
    assert set(out.index["source_tile_id"]) <= train_ids
    assert (out.get() < 250).all()  # held-out tiles are all 255


def test_copies_use_each_original_evenly(store_and_split: tuple[TileStore, pd.DataFrame]) -> None:
    _, table = store_and_split
    train = table[table["split"] == "train"]
    plan = plan_copies(train, ["big", "mid", "small"], TARGET, seed=1)
    uses = plan.groupby("label")["source_tile_id"].value_counts()
    assert uses["small"].tolist() == [3, 3, 3]  # 9 copies over 3 originals
    assert sorted(uses["mid"].tolist()) == [1, 1, 1, 2, 2]  # 7 copies over 5 originals
    assert "big" not in uses.index.get_level_values(0)


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(
    store_and_split: tuple[TileStore, pd.DataFrame], tmp_path: Path
) -> None:
    store, table = store_and_split
    options = {"vertical_flip": True, "rotate90": True, "stain_jitter": 0.05, "brightness": 0.1,
               "contrast": 0.2}
    params = ap(**options)
    stream = augment_training_set(store, table, params)
    first = store_bytes(write(stream, tmp_path / "a").path)
    # Iterating the same stream again, and building it again, both replay the same draws.
    assert store_bytes(write(stream, tmp_path / "b").path) == first
    again = augment_training_set(store, table, params)
    assert store_bytes(write(again, tmp_path / "c").path) == first
    other = write(augment_training_set(store, table, ap(**options, seed=4)), tmp_path / "d")
    other_bytes = store_bytes(other.path)
    assert set(other_bytes) == set(first)
    assert other_bytes["shard-00001.npy"] != first["shard-00001.npy"]


def test_flip_only_and_rot90_only_give_exact_flips_and_turns() -> None:
    tiles = np.random.default_rng(1).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    off = {"rotation_degrees": 0, "width_shift": 0, "height_shift": 0, "horizontal_flip": False}
    flip = TileAugmenter(typed("augmentation", **{**off, "horizontal_flip": True}),
                         tiles.shape[1:])(tiles)
    flipped = [np.array_equal(o, t[:, ::-1]) for o, t in zip(flip, tiles, strict=True)]
    kept = [np.array_equal(o, t) for o, t in zip(flip, tiles, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and any(flipped) and any(kept)
    turned = TileAugmenter(typed("augmentation", **{**off, "rotate90": True}),
                           tiles.shape[1:])(tiles)
    turns = [
        [k for k in range(4) if np.array_equal(o, np.rot90(t, k))]
        for o, t in zip(turned, tiles, strict=True)
    ]
    assert all(len(k) == 1 for k in turns) and len({k[0] for k in turns}) > 1


def test_rotation_and_shift_keep_shape_and_change_pixels() -> None:
    tiles = np.random.default_rng(2).integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8)
    out = TileAugmenter(typed("augmentation", horizontal_flip=False), tiles.shape[1:])(tiles)
    assert out.shape == tiles.shape and out.dtype == np.uint8
    assert (out != tiles).any(axis=(1, 2, 3)).all()


def test_stain_jitter_is_identity_at_zero_strength_and_shifts_colour_otherwise() -> None:
    x = np.random.default_rng(3).uniform(1, 255, (4, 8, 8, 3)).astype(np.float32)
    same = stain_jitter(x, np.random.default_rng(0), 0.0)
    np.testing.assert_allclose(same, x, rtol=1e-3, atol=0.05)
    jittered = stain_jitter(x, np.random.default_rng(0), 0.1)
    assert np.abs(jittered - x).mean() > 1.0


def test_rot90_on_non_square_tiles_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="rotate90 needs square tiles; these are 8x16"):
        TileAugmenter(typed("augmentation", rotate90=True), (8, 16, 3))


def test_split_table_from_another_store_is_refused(
    store_and_split: tuple[TileStore, pd.DataFrame],
) -> None:
    store, table = store_and_split
    other = table.copy()
    other.loc[0, "label"] = "mid" if other.loc[0, "label"] != "mid" else "big"
    with pytest.raises(ValueError, match=r"does not belong to tile store .*column 'label'"):
        augment_training_set(store, other, PARAMS)
    unknown = table.copy()
    unknown.loc[0, "tile_id"] = 999
    with pytest.raises(ValueError, match="training tile id"):
        augment_training_set(store, unknown, PARAMS)


def test_class_without_training_tiles_is_named(
    store_and_split: tuple[TileStore, pd.DataFrame],
) -> None:
    store, table = store_and_split
    no_small = table.copy()
    no_small.loc[no_small["label"] == "small", ["split", "fold"]] = ["test", -1]
    with pytest.raises(ValueError, match="Class 'small' has no tiles in the training split"):
        augment_training_set(store, no_small, PARAMS)


def test_bad_parameters_are_named() -> None:
    with pytest.raises(ParameterError, match=r"augmentation.fill_mode = 'mirror': must be 'refl"):
        ap(fill_mode="mirror")
    with pytest.raises(ParameterError, match=r"augmentation.zoom = 0.1: unknown key"):
        ap(zoom=0.1)


def test_grid_has_a_pair_of_axes_per_sample_and_class(
    store_and_split: tuple[TileStore, pd.DataFrame], tmp_path: Path
) -> None:
    store, table = store_and_split
    out = write(augment_training_set(store, table, PARAMS), tmp_path / "aug")
    fig = plot_augmentation_grid(out, ap(**{"grid_samples_per_class": 3}))
    assert len(fig.axes) == 3 * 2 * 3
    shown = [len(ax.images) for ax in fig.axes]
    # 'big' (row 0) has no copies: originals with empty neighbours; other rows show pairs.
    assert shown[:6] == [1, 0, 1, 0, 1, 0]
    assert shown[6:] == [1] * 12
    assert fig.axes[0].get_ylabel() == "big"
    fig.savefig(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_pipeline_reads_tiles_and_split_and_plots_the_saved_store() -> None:
    names = {n.name: n for n in create_pipeline().nodes}
    assert names["augment_training_set"].inputs == ["tiles", "split_table", "params:augmentation"]
    assert names["augment_training_set"].outputs == ["augmented_train_tiles"]
    assert names["plot_augmentation_grid"].inputs == [
        "augmented_train_tiles",
        "params:augmentation",
    ]
    assert names["plot_augmentation_grid"].outputs == ["augmentation_grid"]
