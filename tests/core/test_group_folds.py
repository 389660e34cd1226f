"""One grouped-fold helper serves the four grouped splits; the folds they give did not change.

The expected folds below were computed on this fixed table by each caller's own
``StratifiedGroupKFold`` code before the helper replaced it: the same table and seed must
still give the same folds (a changed fold would silently change every split, study and
cross-validation made since).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from neuroblastoma_cnn.core.errors import DataError
from neuroblastoma_cnn.core.group_folds import (
    check_group_folds,
    fold_of_groups,
    stratified_group_folds,
)
from neuroblastoma_cnn.models.classical import grouped_folds
from neuroblastoma_cnn.pipelines.cross_validation.folds import assign_folds
from neuroblastoma_cnn.pipelines.features.heads import group_folds
from neuroblastoma_cnn.pipelines.features.params import CvParams
from neuroblastoma_cnn.pipelines.splitting.spanning_groups import _sgkf_folds


def tile_table() -> pd.DataFrame:
    """15 patients of 3 classes with 2 to 6 tiles each; one tile of p04 has another class."""
    rows = []
    for g in range(15):
        label = "abc"[g % 3]
        for i in range(2 + (g * 7) % 5):
            rows.append({"tile_id": len(rows), "image_path": f"{label}/p{g:02d}/img{i // 2}.png",
                         "label": label if (g != 4 or i) else "b", "group": f"p{g:02d}",
                         "split": "test" if g in (0, 1, 2) else "train"})
    return pd.DataFrame(rows)


def test_stratified_group_folds_keep_groups_whole_and_give_the_same_folds_again() -> None:
    table = tile_table()
    folds = stratified_group_folds(table["label"], table["group"], 3, seed=1)
    assert len(folds) == 3
    assert sorted(np.concatenate([test for _, test in folds]).tolist()) == list(range(len(table)))
    again = stratified_group_folds(table["label"], table["group"], 3, seed=1)
    assert all((a[1] == b[1]).all() for a, b in zip(folds, again, strict=True))
    assert set(fold_of_groups(folds, table["group"])) == set(table["group"])


def test_the_leak_check_refuses_a_group_on_both_sides() -> None:
    groups = np.array(["p1", "p1", "p2", "p2"])
    with pytest.raises(DataError, match=r"fold 1 has group\(s\) \['p2'\] on both sides"):
        check_group_folds([(np.array([0, 1]), np.array([2, 3])),
                           (np.array([0, 2]), np.array([3]))], groups)


def test_the_splitting_folds_are_unchanged() -> None:
    assert _sgkf_folds(tile_table(), "group", 4, 11) == {
        "p02": 0, "p09": 0, "p10": 0, "p13": 0, "p01": 1, "p11": 1, "p12": 1, "p05": 2,
        "p06": 2, "p07": 2, "p08": 2, "p00": 3, "p03": 3, "p04": 3, "p14": 3}


def test_the_cross_validation_folds_are_unchanged() -> None:
    folds = assign_folds(tile_table(), 3, 5, outer_test=True)
    assert folds.groupby("group")["fold"].first().to_dict() == {
        "p00": -1, "p01": -1, "p02": -1, "p03": 1, "p04": 2, "p05": 2, "p06": 1, "p07": 1,
        "p08": 1, "p09": 2, "p10": 0, "p11": 2, "p12": 0, "p13": 0, "p14": 0}


def _test_groups(table: pd.DataFrame, folds: list) -> list[list[str]]:
    return [sorted(set(table["group"].iloc[test])) for _, test in folds]


@pytest.mark.parametrize(("shuffle", "expected"), [
    (True, [["p00", "p05", "p07", "p09", "p14"], ["p04", "p08", "p10", "p11", "p12"],
            ["p01", "p02", "p03", "p06", "p13"]]),
    (False, [["p02", "p03", "p04", "p06", "p10"], ["p00", "p07", "p08", "p09", "p11"],
             ["p01", "p05", "p12", "p13", "p14"]]),
])
def test_the_feature_heads_folds_are_unchanged(shuffle: bool, expected: list) -> None:
    table = tile_table()
    labels = table["label"].map({"a": 0, "b": 1, "c": 2}).to_numpy()
    cv = CvParams.parse({"strategy": "stratified_group_kfold", "n_splits": 3,
                         "shuffle": shuffle, "seed": 2}, "features.heads.cv")
    assert _test_groups(table, group_folds(labels, table["group"].tolist(), None, cv)) == expected


def test_the_classical_floor_inner_folds_are_unchanged() -> None:
    table = tile_table()
    folds = grouped_folds(table["label"].tolist(), table["group"].tolist(), 4, seed=3)
    assert _test_groups(table, folds) == [
        ["p01", "p11", "p12"], ["p02", "p09", "p10", "p13"], ["p05", "p06", "p07", "p08"],
        ["p00", "p03", "p04", "p14"]]
