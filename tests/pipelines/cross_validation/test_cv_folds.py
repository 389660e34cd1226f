"""Cross-validation folds on hand-made tile tables: whole patients per fold, the outer test
patients out of every fold, class shares kept, and each fold's split table (validation drawn
from its training folds only). Pure pandas: no Keras, no Kedro session."""

from __future__ import annotations

import pandas as pd
import pytest

from neuroblastoma_cnn.core.errors import DataError, ParameterError
from neuroblastoma_cnn.pipelines.cross_validation.folds import (
    CV,
    FOLD_COLUMNS,
    HELD_OUT,
    OUTER,
    OUTER_SPLIT,
    as_evaluated,
    assign_folds,
    check_fold_count,
    check_folds,
    fold_split_table,
    group_labels,
)
from neuroblastoma_cnn.trials.repeats import draw_validation_groups as _draw_validation_groups

#: Class names with a space, a dash and mixed case; groups per class that are not ``test``.
FOLDED_GROUPS = {"a b": 6, "Poorly-diff": 7, "c3": 5, "zeta": 3}


def tile_table(folded: dict[str, int] | None = None, test_groups: int = 2,
               images_per_group: int = 2, tiles_per_image: int = 3) -> pd.DataFrame:
    """The split table's columns: per class ``folded[class]`` train/validation groups and
    ``test_groups`` test groups, each with a few images of a few tiles."""
    folded = FOLDED_GROUPS if folded is None else folded
    rows = []
    for c, (label, n) in enumerate(folded.items()):
        for g in range(n + test_groups):
            group = f"p{c}{g:02d}"
            split = "test" if g >= n else ("validation" if g == 0 else "train")
            for i in range(images_per_group):
                path = f"{label}/{group}/img_{i}.png"
                for _ in range(tiles_per_image):
                    rows.append({"tile_id": len(rows), "image_path": path, "label": label,
                                 "group": group, "split": split})
    return pd.DataFrame(rows)


def _where(folds: pd.DataFrame) -> pd.Series:
    """Each group's fold (-1 for outer), from a fold table where every group has one fold."""
    spread = folds.groupby("group")["fold"].nunique()
    assert (spread == 1).all(), spread[spread > 1]
    return folds.groupby("group")["fold"].first()


# ------------------------------------------------------------------------------ fold table


def test_group_labels_majority_and_ties():
    table = pd.DataFrame({"group": ["g1", "g1", "g1", "g2", "g2", "g3"],
                          "label": ["y", "x", "y", "y", "x", "z"]})
    labels = group_labels(table)
    assert labels.to_dict() == {"g1": "y", "g2": "x", "g3": "z"}  # g2 ties: first name


def test_every_group_in_exactly_one_fold():
    table = tile_table()
    folds = assign_folds(table, n_folds=3, seed=0, outer_test=True)
    assert list(folds.columns) == FOLD_COLUMNS
    assert folds["image_path"].is_unique
    assert set(folds["image_path"]) == set(table["image_path"])
    assert folds["n_tiles"].sum() == len(table)
    assert (folds["n_tiles"] == 3).all()
    where = _where(folds)
    cv = folds[folds["role"] == CV]
    assert set(cv["fold"]) == {0, 1, 2}
    assert set(where[where >= 0].index) == set(table.loc[table["split"] != "test", "group"])
    check_folds(folds, 3)


def test_outer_test_patients_stay_out_of_every_fold():
    table = tile_table()
    test_images = set(table.loc[table["split"] == "test", "image_path"])
    folds = assign_folds(table, n_folds=3, seed=0, outer_test=True)
    outer = folds[folds["image_path"].isin(test_images)]
    assert len(outer) == len(test_images)
    assert (outer["role"] == OUTER).all() and (outer["fold"] == -1).all()
    rest = folds[~folds["image_path"].isin(test_images)]
    assert (rest["role"] == CV).all() and rest["fold"].between(0, 2).all()
    assert not set(outer["group"]) & set(rest["group"])


def test_without_outer_test_every_image_is_folded():
    table = tile_table()
    folds = assign_folds(table, n_folds=3, seed=0, outer_test=False)
    assert (folds["role"] == CV).all()
    assert folds["fold"].between(0, 2).all()
    assert len(folds) == table["image_path"].nunique()
    test_groups = set(table.loc[table["split"] == "test", "group"])
    assert test_groups <= set(folds["group"])
    _where(folds)
    check_folds(folds, 3)


@pytest.mark.parametrize("outer_test", [True, False])
def test_folds_keep_class_shares(outer_test: bool):
    table = tile_table()
    k = 3
    folds = assign_folds(table, n_folds=k, seed=4, outer_test=outer_test)
    cv = folds[folds["role"] == CV].drop_duplicates("group")
    per_fold = pd.crosstab(cv["label"], cv["fold"])
    assert list(per_fold.columns) == list(range(k))
    totals = per_fold.sum(axis=1)
    for label, counts in per_fold.iterrows():
        # every fold has every class, and each class is spread as evenly as its count allows
        assert counts.min() >= 1, label
        assert counts.min() == totals[label] // k, (label, counts.tolist())
        assert counts.max() == -(-totals[label] // k), (label, counts.tolist())


def test_folds_are_seeded():
    table = tile_table()
    first = assign_folds(table, n_folds=3, seed=7, outer_test=True)
    again = assign_folds(table, n_folds=3, seed=7, outer_test=True)
    pd.testing.assert_frame_equal(first, again)

    def partition(folds: pd.DataFrame) -> set[frozenset[str]]:
        cv = folds[folds["role"] == CV]
        return {frozenset(part["group"]) for _, part in cv.groupby("fold")}

    other = assign_folds(table, n_folds=3, seed=8, outer_test=True)
    assert partition(other) != partition(first)


def test_fold_count_names_the_short_class():
    labels = pd.Series({f"g{i}": label for i, label in
                        enumerate(["a b"] * 5 + ["zeta"] * 2 + ["c3"] * 4)})
    check_fold_count(labels, 2)
    with pytest.raises(ParameterError) as raised:
        check_fold_count(labels, 3)
    message = str(raised.value)
    assert "cross_validation.n_folds" in message
    assert "'zeta' has 2" in message
    assert "a b" not in message and "c3" not in message
    assert "n_folds <= 2" in (raised.value.hint or "")


def test_assign_folds_refuses_more_folds_than_groups_of_a_class():
    # zeta has 3 groups besides its test groups: 4 folds are too many with the outer test part
    table = tile_table()
    with pytest.raises(ParameterError, match=r"cross_validation\.n_folds") as raised:
        assign_folds(table, n_folds=4, seed=0, outer_test=True)
    assert "'zeta' has 3" in str(raised.value)
    # ... but not when the test patients are folded too (zeta: 5 groups)
    folds = assign_folds(table, n_folds=4, seed=0, outer_test=False)
    assert set(folds["fold"]) == {0, 1, 2, 3}


def test_check_folds_refuses_a_group_in_two_folds():
    folds = assign_folds(tile_table(), n_folds=3, seed=0, outer_test=True)
    check_folds(folds, 3)
    cv = folds.index[folds["role"] == CV]
    group = folds.loc[cv[0], "group"]
    mine = folds.index[folds["group"] == group]
    assert len(mine) >= 2
    split = folds.copy()
    split.loc[mine[0], "fold"] = (split.loc[mine[0], "fold"] + 1) % 3
    with pytest.raises(DataError, match=group):
        check_folds(split, 3)


def test_check_folds_refuses_a_group_in_a_fold_and_the_outer_part():
    folds = assign_folds(tile_table(), n_folds=3, seed=0, outer_test=True)
    group = folds.loc[folds["role"] == CV, "group"].iloc[0]
    first = folds.index[folds["group"] == group][0]
    leak = folds.copy()
    leak.loc[first, ["role", "fold"]] = [OUTER, -1]
    with pytest.raises(DataError, match=group):
        check_folds(leak, 3)


def test_check_folds_refuses_an_empty_fold():
    folds = assign_folds(tile_table(), n_folds=3, seed=0, outer_test=True)
    with pytest.raises(DataError, match=r"\[3\]"):
        check_folds(folds, 4)


def test_groups_spanning_classes_and_numeric_ids_stay_whole():
    # slides holding two tissue classes; group ids as integers in the split table
    table = tile_table({"a b": 6, "c3": 6, "zeta": 6}, images_per_group=3)
    first_image = table.groupby("group")["image_path"].transform("first")
    other = {"a b": "c3", "c3": "zeta", "zeta": "a b"}
    table.loc[table["image_path"] != first_image, "label"] = table["label"].map(other)
    ids = {g: i for i, g in enumerate(sorted(table["group"].unique()))}
    table["group"] = table["group"].map(ids)
    folds = assign_folds(table, n_folds=3, seed=1, outer_test=True)
    where = _where(folds)
    assert set(where.index) == {str(i) for i in ids.values()}
    assert folds.groupby("group")["label"].nunique().max() == 2
    check_folds(folds, 3)
    for fold in range(3):
        out = fold_split_table(table, folds, fold, seed=0, validation_fraction=0.2)
        split_of = out.groupby("group")["split"].agg(set)
        assert (split_of.map(len) == 1).all()
        val = {g for g, s in split_of.items() if s == {"validation"}}
        assert val and all(where[str(g)] not in (fold, -1) for g in val)


# ------------------------------------------------------------------------ one fold's table


@pytest.mark.parametrize("fold", [0, 1, 2])
def test_fold_split_table_roles(fold: int):
    table = tile_table()
    folds = assign_folds(table, n_folds=3, seed=0, outer_test=True)
    out = fold_split_table(table, folds, fold, seed=0, validation_fraction=0.34)
    where = folds.set_index("image_path")
    role, fold_of = out["image_path"].map(where["role"]), out["image_path"].map(where["fold"])
    # same tiles, same order, the other columns untouched
    pd.testing.assert_frame_equal(out.drop(columns="split"), table.drop(columns="split"))
    assert table["split"].isin(["train", "validation", "test"]).all()  # input not modified
    assert set(out["split"]) == {"train", "validation", HELD_OUT, OUTER_SPLIT}
    assert (out.loc[fold_of == fold, "split"] == HELD_OUT).all()
    assert (out.loc[role == OUTER, "split"] == OUTER_SPLIT).all()
    assert (out.loc[out["split"] == HELD_OUT].index == out.index[fold_of == fold]).all()
    training = (role == CV) & (fold_of != fold)
    assert out.loc[training, "split"].isin(["train", "validation"]).all()
    assert (out.loc[out["split"].isin(["train", "validation"])].index
            == out.index[training]).all()
    per_group = out.groupby("group")["split"].nunique()
    assert (per_group == 1).all()  # a group is all train or all validation
    split_of = out.groupby("group")["split"].first()
    val = set(split_of[split_of == "validation"].index)
    train = set(split_of[split_of == "train"].index)
    assert val and train and not val & train
    assert val <= set(folds.loc[(folds["role"] == CV) & (folds["fold"] != fold), "group"])
    # per class round(0.34 n) validation groups (at least one, one left to train)
    labels = group_labels(out[training])
    for label, groups in labels.groupby(labels):
        n = len(groups)
        drawn = len(set(groups.index) & val)
        assert drawn == min(max(1, round(0.34 * n)), n - 1), (label, n, drawn)


def test_fold_split_table_without_outer_test():
    table = tile_table()
    folds = assign_folds(table, n_folds=3, seed=0, outer_test=False)
    out = fold_split_table(table, folds, 1, seed=0, validation_fraction=0.2)
    assert OUTER_SPLIT not in set(out["split"])
    was_test = table["split"] == "test"
    assert out.loc[was_test, "split"].isin(["train", "validation", HELD_OUT]).all()
    fold_of = out["image_path"].map(folds.set_index("image_path")["fold"])
    assert ((out["split"] == HELD_OUT) == (fold_of == 1)).all()


def test_validation_draw_is_seeded_per_fold():
    table = tile_table({"a b": 12, "Poorly-diff": 12, "c3": 12})
    folds = assign_folds(table, n_folds=3, seed=0, outer_test=True)

    def validation(fold: int, seed: int) -> frozenset[str]:
        out = fold_split_table(table, folds, fold, seed, validation_fraction=0.25)
        return frozenset(out.loc[out["split"] == "validation", "group"])

    assert validation(0, 0) == validation(0, 0)
    assert validation(0, 0) != validation(0, 1)
    draws = [validation(f, 0) for f in range(3)]
    assert len(set(draws)) == 3
    for f, drawn in enumerate(draws):
        assert not drawn & set(folds.loc[folds["fold"] == f, "group"])
        # as documented: the draw of fold f is seeded by seed + f, on its training folds only
        training = table["image_path"].isin(
            folds.loc[(folds["role"] == CV) & (folds["fold"] != f), "image_path"])
        assert drawn == _draw_validation_groups(table[training], 0 + f, 0.25)


def test_fold_without_a_second_training_group_has_no_validation():
    # 2 folds, 2 groups per class: each fold trains on one group per class
    table = tile_table({"a b": 2, "c3": 2, "zeta": 2}, test_groups=1)
    folds = assign_folds(table, n_folds=2, seed=0, outer_test=True)
    check_folds(folds, 2)
    with pytest.raises(DataError, match="no validation group") as raised:
        fold_split_table(table, folds, 0, seed=0, validation_fraction=0.15)
    assert "n_folds" in (raised.value.hint or "")


def test_fold_split_table_refuses_a_foreign_fold_table():
    table = tile_table()
    folds = assign_folds(table, n_folds=3, seed=0, outer_test=True)
    with pytest.raises(DataError, match="different images"):
        fold_split_table(table, folds.iloc[1:], 0, seed=0, validation_fraction=0.2)


def test_as_evaluated_renames_only_the_chosen_split():
    table = tile_table()
    folds = assign_folds(table, n_folds=3, seed=0, outer_test=True)
    fold_table = fold_split_table(table, folds, 2, seed=0, validation_fraction=0.2)
    for split in ("train", "validation", HELD_OUT, OUTER_SPLIT):
        evaluated = as_evaluated(fold_table, split)
        chosen = fold_table["split"] == split
        assert chosen.any()
        assert (evaluated.loc[chosen, "split"] == "test").all()
        assert (evaluated.loc[~chosen, "split"] == "train").all()
        pd.testing.assert_frame_equal(evaluated.drop(columns="split"),
                                      fold_table.drop(columns="split"))
    assert OUTER_SPLIT in set(fold_table["split"])  # the input is not modified
