"""Unit tests of the splitting nodes on small synthetic tile stores."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _params import params as typed

from neuroblastoma_cnn.core.errors import ParameterError
from neuroblastoma_cnn.datasets import TileStore, write_tile_store
from neuroblastoma_cnn.pipelines.splitting import create_pipeline
from neuroblastoma_cnn.pipelines.splitting.nodes import (
    SPLIT_COLUMNS,
    check_no_leakage,
    split_tiles,
    summarise_split,
)

SETTINGS = {
    "strategy": "patient",
    "test_fraction": 0.2,
    "validation_fraction": 0.1,
    "n_folds": 2,
    "seed": 42,
}
PARAMS = typed("splitting", **SETTINGS)


def sp(**overrides: object) -> object:
    """The test's splitting parameters with ``overrides``, validated."""
    return typed("splitting", **{**SETTINGS, **overrides})


def make_store(
    path: Path,
    groups_per_class: dict[str, int],
    images_per_group: int = 2,
    tiles_per_image: int = 2,
    mixed: dict[str, str] | None = None,
) -> TileStore:
    """A store of 4x4 tiles laid out like ingestion's: `<Class>/<group>/img<k>.png` per image.

    `mixed` maps a group name to a second class that gets one extra image in that group.
    """
    rng = np.random.default_rng(0)
    records = []
    for label, n_groups in groups_per_class.items():
        for g in range(n_groups):
            group = f"{label}-P{g:02d}"
            images = [(label, f"{label}/{group}/img{i}.png") for i in range(images_per_group)]
            if mixed and group in mixed:
                other = mixed[group]
                images.append((other, f"{other}/{group}/odd.png"))
            for lab, image in images:
                for t in range(tiles_per_image):
                    tile = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
                    records.append(
                        (
                            tile,
                            {
                                "image_path": image,
                                "label": lab,
                                "group": group,
                                "x": 4 * t,
                                "y": 0,
                                "tissue_fraction": 1.0,
                            },
                        )
                    )
    return write_tile_store(path, records, {"classes": sorted(groups_per_class)}, shard_size=16)


def units_per_split(table: pd.DataFrame, unit: str) -> pd.Series:
    return table.groupby(unit)["split"].nunique()


def test_table_has_one_row_per_tile_with_contract_columns(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", {"A": 5, "B": 5})
    table = split_tiles(store, PARAMS)
    assert list(table.columns) == list(SPLIT_COLUMNS)
    assert table["tile_id"].tolist() == store.index["tile_id"].tolist()
    assert set(table["split"]) == {"train", "validation", "test"}
    assert table["fold"].dtype.kind == "i"


def test_patient_split_keeps_every_group_in_one_split(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", {"A": 10, "B": 7, "C": 4})
    table = split_tiles(store, PARAMS)
    assert (units_per_split(table, "group") == 1).all()
    # Fractions are of a class's groups: 10 groups -> 2 test, 1 validation, 7 train.
    a = table[table["label"] == "A"].groupby("split")["group"].nunique()
    assert a.to_dict() == {"test": 2, "validation": 1, "train": 7}


def test_class_with_three_groups_gets_one_group_in_each_split(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", {"few": 3, "many": 12})
    for seed in range(5):
        table = split_tiles(store, sp(**{"seed": seed}))
        few = table[table["label"] == "few"].groupby("split")["group"].nunique()
        assert few.to_dict() == {"train": 1, "validation": 1, "test": 1}


def test_class_with_two_groups_is_a_clear_error(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", {"Ganglioneuroma": 2, "many": 12})
    with pytest.raises(ValueError, match=r"Class 'Ganglioneuroma' has only 2 patient group") as err:
        split_tiles(store, PARAMS)
    assert "at least 3" in str(err.value)


def test_two_groups_suffice_without_a_validation_split(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", {"A": 2, "B": 2})
    table = split_tiles(store, sp(**{"validation_fraction": 0.0, "n_folds": 0}))
    assert set(table["split"]) == {"train", "test"}
    assert (table["fold"][table["split"] == "train"] == 0).all()


def test_split_is_deterministic_for_a_seed_and_differs_across_seeds(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", {"A": 10, "B": 10})
    first = split_tiles(store, PARAMS)
    pd.testing.assert_frame_equal(first, split_tiles(store, PARAMS))
    other = split_tiles(store, sp(**{"seed": 7}))
    assert not first["split"].equals(other["split"])


def test_folds_cover_non_test_groups_and_mark_test_rows(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", {"A": 10, "B": 10, "C": 10})
    table = split_tiles(store, sp(**{"n_folds": 4}))
    test = table["split"] == "test"
    assert (table.loc[test, "fold"] == -1).all()
    assert set(table.loc[~test, "fold"]) == {0, 1, 2, 3}
    assert (table.groupby("group")["fold"].nunique() == 1).all()
    # 8 non-test groups per class over 4 folds: every fold gets 2 groups of every class.
    per_fold = table[~test].groupby(["fold", "label"])["group"].nunique()
    assert (per_fold == 2).all() and len(per_fold) == 12


def test_too_many_folds_is_a_clear_error(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", {"A": 3, "B": 3})
    with pytest.raises(ValueError, match="n_folds is 9 but only 4 group"):
        split_tiles(store, sp(**{"n_folds": 9}))


def test_group_with_two_classes_stays_whole_and_every_class_reaches_every_split(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A-P00 has two 'A' images and one 'B' image. (Issue 8 replaced "stratified by its majority
    # class" with StratifiedGroupKFold folds for groups spanning classes: see
    # test_splitting_spanning_groups.py.)
    store = make_store(tmp_path / "s", {"A": 3, "B": 3}, mixed={"A-P00": "B"})
    with caplog.at_level(logging.INFO):
        table = split_tiles(store, PARAMS)
    assert "1 of 6 patient group(s) hold tiles of several classes (e.g. A-P00)" in caplog.text
    assert (units_per_split(table, "group") == 1).all()
    assert table.groupby("split")["label"].nunique().to_dict() == {
        "train": 2, "validation": 2, "test": 2}


def test_image_strategy_keeps_images_whole_but_may_share_patients(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = make_store(tmp_path / "s", {"A": 3, "B": 3}, images_per_group=5)
    params = sp(**{"strategy": "image"})
    table = split_tiles(store, params)
    assert (units_per_split(table, "image_path") == 1).all()
    # 15 images per class: 3 test, 2 validation (carved per image too), 10 train.
    a = table[table["label"] == "A"].groupby("split")["image_path"].nunique()
    assert a.to_dict() == {"test": 3, "validation": 2, "train": 10}
    assert (units_per_split(table, "group") > 1).any()  # what the patient strategy prevents
    assert (table.groupby("image_path")["fold"].nunique() == 1).all()
    with caplog.at_level(logging.WARNING):
        assert check_no_leakage(table, params) is table
    assert "patient group(s) have images in more than one split" in caplog.text


def test_leakage_check_fails_with_the_leaking_group_named(tmp_path: Path) -> None:
    table = split_tiles(make_store(tmp_path / "s", {"A": 5, "B": 5}), PARAMS)
    assert check_no_leakage(table, PARAMS) is table
    bad = table.copy()
    row = bad.index[(bad["group"] == "A-P01")][0]
    bad.loc[row, "split"] = "test" if bad.loc[row, "split"] != "test" else "train"
    bad.loc[row, "fold"] = -1 if bad.loc[row, "split"] == "test" else 0
    with pytest.raises(ValueError, match=r"Leakage: 1 group value\(s\).*'A-P01' in"):
        check_no_leakage(bad, PARAMS)


def test_leakage_check_fails_on_image_in_two_splits_for_image_strategy(tmp_path: Path) -> None:
    params = sp(**{"strategy": "image"})
    table = split_tiles(make_store(tmp_path / "s", {"A": 5, "B": 5}), params)
    bad = table.copy()
    image = bad.loc[bad["split"] == "train", "image_path"].iloc[0]
    first = bad.index[bad["image_path"] == image][0]
    bad.loc[first, ["split", "fold"]] = ["test", -1]
    with pytest.raises(ValueError, match=f"Leakage: 1 image_path.*'{image}'"):
        check_no_leakage(bad, params)


def test_leakage_check_fails_on_group_in_two_folds_and_bad_test_folds(tmp_path: Path) -> None:
    table = split_tiles(make_store(tmp_path / "s", {"A": 6, "B": 6}), PARAMS)
    train_group = table.loc[table["split"] == "train", "group"].iloc[0]
    bad = table.copy()
    rows = bad.index[bad["group"] == train_group]
    bad.loc[rows[0], "fold"] = 1 - bad.loc[rows[0], "fold"]
    with pytest.raises(ValueError, match="more than one cross-validation fold"):
        check_no_leakage(bad, PARAMS)
    bad = table.copy()
    bad.loc[bad["split"] == "test", "fold"] = 0
    with pytest.raises(ValueError, match="test rows must have fold -1"):
        check_no_leakage(bad, PARAMS)


def test_summary_counts_images_groups_and_tiles_per_class_and_split(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", {"A": 10, "B": 3}, images_per_group=2, tiles_per_image=3)
    summary = summarise_split(split_tiles(store, PARAMS))
    assert list(summary.columns) == ["split", "label", "groups", "images", "tiles", "tile_share"]
    assert summary["split"].tolist() == ["train"] * 2 + ["validation"] * 2 + ["test"] * 2
    a = summary[summary["label"] == "A"].set_index("split")
    assert a["groups"].to_dict() == {"train": 7, "validation": 1, "test": 2}
    assert (a["images"] == 2 * a["groups"]).all() and (a["tiles"] == 6 * a["groups"]).all()
    assert summary.groupby("label")["tile_share"].sum().round(3).eq(1.0).all()


def test_bad_inputs_get_clear_messages(tmp_path: Path) -> None:
    store = write_tile_store(
        tmp_path / "nogroup",
        [(np.zeros((2, 2, 3), np.uint8), {"image_path": "a.png", "label": "A"})],
    )
    with pytest.raises(ValueError, match=r"nogroup.*lacks column\(s\) \['group'\]"):
        split_tiles(store, PARAMS)
    with pytest.raises(ParameterError, match=r"splitting.strategy = 'slide': must be 'patient'"):
        sp(strategy="slide")
    with pytest.raises(ParameterError, match=r"0.6 \+ 0.5: must be below 1"):
        sp(test_fraction=0.6, validation_fraction=0.5)


def test_numeric_group_and_class_names_stay_strings(tmp_path: Path) -> None:
    records = [
        (
            np.zeros((2, 2, 3), np.uint8),
            {"image_path": f"{c}/{c}{g}/i.png", "label": str(c), "group": f"{c}{g}"},
        )
        for c in (0, 1)
        for g in range(3)
    ]
    table = split_tiles(write_tile_store(tmp_path / "n", records), PARAMS)
    assert table["label"].tolist() == ["0"] * 3 + ["1"] * 3
    assert table.groupby("label")["split"].nunique().eq(3).all()


def test_pipeline_wires_check_between_split_and_saved_table() -> None:
    pipeline = create_pipeline()
    names = {n.name: n for n in pipeline.nodes}
    assert set(names) == {"split_by_group", "check_no_leakage", "summarise_split"}
    assert names["split_by_group"].inputs == ["tiles", "params:splitting"]
    assert names["check_no_leakage"].outputs == ["split_table"]
    assert names["summarise_split"].inputs == ["split_table", "params:splitting"]
    assert names["summarise_split"].outputs == ["split_summary"]
