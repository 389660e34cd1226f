"""Splitting when groups span classes (slides holding several tissue classes, patients with
images of several grades): StratifiedGroupKFold folds, whole groups, every class everywhere the
groups allow, and a summary that says how far each split is from its target share."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from _params import params as typed

from neuroblastoma_cnn.core.errors import DataError
from neuroblastoma_cnn.pipelines.splitting.nodes import (
    SPLIT_COLUMNS,
    check_no_leakage,
    split_tiles,
    summarise_split,
)

CLASSES = [f"{i:02d}_{name}" for i, name in enumerate(
    ["TUMOR", "STROMA", "COMPLEX", "LYMPHO", "DEBRIS", "MUCOSA", "ADIPOSE", "EMPTY"], start=1)]


def sp(**overrides: object):
    settings = {"strategy": "patient", "test_fraction": 0.2, "validation_fraction": 0.1,
                "n_folds": 3, "seed": 42}
    return typed("splitting", **{**settings, **overrides})


def slides_index(n_slides: int = 10, seed: int = 0, classes: list[str] = CLASSES,
                 absent: float = 0.2) -> pd.DataFrame:
    """A Kather-like tile index: every slide holds an uneven number of tiles of most classes."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_slides):
        slide = f"CRC-Prim-HE-{s + 1:02d}"
        for label in classes:
            if rng.random() < absent:
                continue
            for t in range(int(rng.integers(5, 60))):
                rows.append({"image_path": f"{label}/{slide}_{t}.tif", "label": label,
                             "group": slide})
    index = pd.DataFrame(rows)
    index.insert(0, "tile_id", np.arange(len(index)))
    return index


def test_slides_spanning_classes_stay_whole_and_every_class_is_in_every_split(
    caplog: pytest.LogCaptureFixture,
) -> None:
    index = slides_index()
    p = sp()
    with caplog.at_level(logging.INFO):
        table = split_tiles(index, p)
    assert list(table.columns) == list(SPLIT_COLUMNS)
    assert (table.groupby("group")["split"].nunique() == 1).all()
    # 10 slides, 0.2 / 0.1: 2 test slides, 1 validation slide, 7 train slides
    assert table.groupby("split")["group"].nunique().to_dict() == {
        "test": 2, "validation": 1, "train": 7}
    assert (table.groupby("split")["label"].nunique() == len(CLASSES)).all()
    assert "10 of 10 patient group(s) hold tiles of several classes" in caplog.text
    assert "StratifiedGroupKFold" in caplog.text
    assert check_no_leakage(table, p) is table


def test_no_three_groups_per_class_needed_when_groups_span_classes() -> None:
    # Five classes, three slides in all: the one-class-per-patient rule would need 15 patients.
    index = slides_index(n_slides=3, classes=CLASSES[:5], absent=0.0)
    table = split_tiles(index, sp(n_folds=0))
    assert sorted(table.groupby("split")["group"].nunique()) == [1, 1, 1]
    assert (table.groupby("split")["label"].nunique() == 5).all()


def test_two_groups_in_all_are_a_clear_error() -> None:
    index = slides_index(n_slides=2, absent=0.0)
    with pytest.raises(DataError, match=r"Only 2 patient group\(s\) in all; .* at least 3 so "
                                        r"that train, validation and test each get one"):
        split_tiles(index, sp())


def test_class_in_one_slide_only_is_reported_by_the_leakage_check(
    caplog: pytest.LogCaptureFixture,
) -> None:
    index = slides_index(classes=CLASSES[:4])
    rare = pd.DataFrame({"tile_id": len(index) + np.arange(5),
                         "image_path": [f"RARE/x{i}.tif" for i in range(5)],
                         "label": "RARE", "group": "CRC-Prim-HE-03"})
    p = sp()
    with caplog.at_level(logging.WARNING):
        table = check_no_leakage(split_tiles(pd.concat([index, rare]), p), p)
    assert (table.groupby("group")["split"].nunique() == 1).all()
    splits_with_rare = set(table.loc[table["label"] == "RARE", "split"])
    assert len(splits_with_rare) == 1
    assert "has no tiles of class(es) ['RARE']" in caplog.text
    # the other classes still reach every split
    common = table[table["label"] != "RARE"]
    assert (common.groupby("split")["label"].nunique() == 4).all()


def test_split_is_seeded_and_its_summary_says_how_far_shares_are_from_the_targets() -> None:
    index = slides_index(n_slides=12)
    p = sp()
    table = split_tiles(index, p)
    pd.testing.assert_frame_equal(table, split_tiles(index, p))  # same seed, same split

    summary = summarise_split(table, p)
    assert list(summary.columns) == ["split", "label", "groups", "images", "tiles",
                                     "tile_share", "target_share", "share_gap"]
    assert summary.set_index("split")["target_share"].groupby("split").first().to_dict() == {
        "train": 0.7, "validation": 0.1, "test": 0.2}
    np.testing.assert_allclose(summary["share_gap"],
                               summary["tile_share"] - summary["target_share"], atol=1e-4)
    # shares of a class's tiles sum to 1 over the splits, so its gaps sum to 0
    assert summary.groupby("label")["share_gap"].sum().abs().max() < 1e-3
    # with 12 slides the search finds a split within 0.1 of every target (0.08 measured)
    assert summary["share_gap"].abs().max() < 0.1


def test_cross_validation_folds_keep_groups_whole_and_test_out() -> None:
    index = slides_index(n_slides=14)
    table = split_tiles(index, sp(n_folds=4))
    test = table["split"] == "test"
    assert (table.loc[test, "fold"] == -1).all()
    assert set(table.loc[~test, "fold"]) == {0, 1, 2, 3}
    assert (table.groupby("group")["fold"].nunique() == 1).all()
    with pytest.raises(DataError, match=r"n_folds is 20 but only \d+ group"):
        split_tiles(index, sp(n_folds=20))


def test_many_groups_split_close_to_the_fractions() -> None:
    index = slides_index(n_slides=60, classes=CLASSES[:3], absent=0.3)
    p = sp()
    table = split_tiles(index, p)
    assert table.groupby("split")["group"].nunique().to_dict() == {
        "test": 12, "validation": 6, "train": 42}
    assert summarise_split(table, p)["share_gap"].abs().max() < 0.05
