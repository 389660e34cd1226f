"""Repeats: patient-grouped, the test split untouched, the same for every variant."""

from __future__ import annotations

import pandas as pd
import pytest

from neuroblastoma_cnn.core.errors import DataError, ParameterError
from neuroblastoma_cnn.trials import repeats


def _table() -> pd.DataFrame:
    """3 classes x 4 patients x 2 tiles; patient 3 of each class is test; folds 0/1 alternate."""
    rows = []
    for c, label in enumerate("ABC"):
        for p in range(4):
            split = "test" if p == 3 else ("validation" if p == 2 else "train")
            for t in range(2):
                rows.append({"tile_id": len(rows), "image_path": f"{label}{p}_{t}.png",
                             "label": label, "group": f"{label}-p{p}", "split": split,
                             "fold": -1 if split == "test" else (p + c) % 2})
    return pd.DataFrame(rows)


def _groups(table: pd.DataFrame, split: str) -> set[str]:
    return set(table.loc[table["split"] == split, "group"])


@pytest.mark.parametrize("scheme", ["folds", "seeded", "split"])
def test_repeats_keep_test_and_never_mix_patients(scheme):
    table = _table()
    seen = []
    for r in range(2):
        rep = repeats.repeat_split_table(table, scheme, r, seed=0, validation_fraction=0.34)
        assert _groups(rep, "test") == _groups(table, "test")
        assert not _groups(rep, "train") & _groups(rep, "validation")
        assert _groups(rep, "validation")
        assert (rep["tile_id"] == table["tile_id"]).all()
        seen.append(frozenset(_groups(rep, "validation")))
        # deterministic: the same repeat twice is the same table (every variant sees it)
        again = repeats.repeat_split_table(table, scheme, r, seed=0, validation_fraction=0.34)
        pd.testing.assert_frame_equal(rep, again)
    if scheme == "folds":
        assert seen[0] != seen[1] and not seen[0] & seen[1]
        assert seen[0] == frozenset(table.loc[table["fold"] == 0, "group"])
    if scheme == "split":
        assert seen[0] == seen[1] == frozenset(_groups(table, "validation"))


def test_seeded_repeats_stratify_by_class():
    rep = repeats.repeat_split_table(_table(), "seeded", 3, seed=7, validation_fraction=0.34)
    val = rep[rep["split"] == "validation"]
    assert val.groupby("label")["group"].nunique().to_dict() == {"A": 1, "B": 1, "C": 1}


def test_fold_repeats_are_limited_by_the_split_table():
    repeats.check_repeats(_table(), "folds", 2)
    with pytest.raises(ParameterError, match="3 repeats on cross-validation folds, but the "
                                             "split table has 2 fold"):
        repeats.check_repeats(_table(), "folds", 3)
    repeats.check_repeats(_table(), "seeded", 10)


def test_training_tiles_follow_their_source_patient():
    table = _table()
    rep = repeats.repeat_split_table(table, "folds", 0, seed=0, validation_fraction=0.2)
    train_ids = table.loc[table["split"] == "train", "tile_id"].tolist()
    # augmented store: the originals plus one copy each, ids renumbered, source kept
    index = pd.DataFrame({"tile_id": range(2 * len(train_ids)),
                          "source_tile_id": train_ids + train_ids})
    kept = repeats.training_tile_ids(index, rep)
    allowed = set(rep.loc[rep["split"] == "train", "tile_id"])
    sources = index.set_index("tile_id").loc[kept, "source_tile_id"]
    assert set(sources) <= allowed and set(sources) == allowed & set(train_ids)
    assert len(kept) == 2 * len(set(sources))
    only_val = rep.assign(split="validation")
    with pytest.raises(DataError, match="No training tiles"):
        repeats.training_tile_ids(index, only_val)
