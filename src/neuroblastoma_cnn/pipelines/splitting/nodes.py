"""Which tiles train, validate and test the models, decided per patient (or per image).

Tiles of one patient are strongly correlated, so a split that lets a patient's tiles land in both
train and test measures memory of the patient, not generalisation. The default strategy therefore
allocates whole groups (patients) to splits, class by class, so every class is represented in
every split. The study's per-image split is kept as strategy ``image`` to compare against.

Allocation rules (per class, over its units: groups for ``patient``, images for ``image``):

* units are shuffled with the seed, then ``round(test_fraction * n)`` go to test and
  ``round(validation_fraction * n)`` to validation, each at least one when its fraction is above
  zero, and at least one unit stays in train. Fractions are therefore fractions of a class's
  patients (or images), not of its tiles; the summary reports the resulting tile shares.
* a class with fewer units than splits to fill (three with the default fractions) is an error
  naming the class, since one of its splits would be empty.
* a group holding images of several classes is stratified by its majority class (most tiles; ties
  go to the class name sorted first) and moved whole, so it never leaks; a warning lists them.
* cross-validation folds (column ``fold``) are assigned over the train and validation units,
  round-robin per class after a seeded shuffle, so each fold gets a near-equal share of every
  class's units; test rows get fold -1.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from neuroblastoma_cnn.datasets import TileStore
from neuroblastoma_cnn.errors import DataError
from neuroblastoma_cnn.params import SplittingParams

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
INDEX_COLUMNS = ("tile_id", "image_path", "label", "group")
SPLIT_COLUMNS = ("tile_id", "image_path", "label", "group", "split", "fold")


def _tile_index(tiles: TileStore | pd.DataFrame) -> pd.DataFrame:
    """The tile table with the columns splitting needs, as strings (CSV may parse '01' as 1)."""
    index = tiles if isinstance(tiles, pd.DataFrame) else tiles.index
    where = "the tile index" if isinstance(tiles, pd.DataFrame) else f"tile store '{tiles.path}'"
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise DataError(f"Cannot split {where}: its index lacks column(s) {missing}.")
    if index.empty:
        raise DataError(f"Cannot split {where}: it holds no tiles.")
    out = index.loc[:, list(INDEX_COLUMNS)].copy()
    out["tile_id"] = out["tile_id"].astype(int)
    for col in ("image_path", "label", "group"):
        out[col] = out[col].astype(str)
    return out


def _unit_classes(index: pd.DataFrame, unit: str) -> pd.Series:
    """Each unit's class: the class of most of its tiles (ties: first class name in order)."""
    counts = index.groupby([unit, "label"]).size().rename("n").reset_index()
    counts = counts.sort_values([unit, "n", "label"], ascending=[True, False, True])
    mixed = counts[unit][counts[unit].duplicated()].unique()
    if len(mixed):
        logger.warning(
            "%d %s(s) hold tiles of several classes, e.g. %s; each is stratified by its majority "
            "class and kept whole in one split.",
            len(mixed),
            unit,
            sorted(mixed)[:5],
        )
    return counts.drop_duplicates(unit).set_index(unit)["label"]


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def _allocation(n_units: int, label: str, params: SplittingParams) -> dict[str, int]:
    """How many of a class's units go to each split; every split with a fraction gets one."""
    needed = [
        s
        for s, f in (("validation", params.validation_fraction), ("test", params.test_fraction))
        if f > 0
    ]
    if n_units < 1 + len(needed):
        kind = "patient group" if params.strategy == "patient" else "image"
        splits = " and ".join([", ".join(["train", *needed[:-1]]), needed[-1]])
        raise DataError(
            f"Class '{label}' has only {n_units} {kind}(s); strategy '{params.strategy}' needs "
            f"at least {1 + len(needed)} per class so that {splits} each get one. Add data for "
            f"'{label}', or set the fraction of a split you do not need to 0."
        )
    n_test = max(1, _round_half_up(params.test_fraction * n_units)) if params.test_fraction else 0
    n_val = (
        max(1, _round_half_up(params.validation_fraction * n_units))
        if params.validation_fraction
        else 0
    )
    while n_units - n_test - n_val < 1:  # keep one unit to train on: shrink the larger holdout
        if n_test >= n_val and n_test > 1:
            n_test -= 1
        else:
            n_val -= 1
    return {"train": n_units - n_test - n_val, "validation": n_val, "test": n_test}


def split_tiles(tiles: TileStore | pd.DataFrame, params: SplittingParams) -> pd.DataFrame:
    """Assigns every tile a split and a cross-validation fold, moving whole units (see module).

    Returns one row per tile, in tile order: tile_id, image_path, label, group, split, fold.
    """
    p = params
    index = _tile_index(tiles)
    unit_class = _unit_classes(index, p.unit)
    rng = np.random.default_rng(p.seed)

    unit_split: dict[str, str] = {}
    for label in sorted(unit_class.unique()):
        units = np.array(sorted(unit_class.index[unit_class == label]))
        units = units[rng.permutation(len(units))]
        sizes = _allocation(len(units), label, p)
        start = 0
        for split in ("test", "validation", "train"):
            for unit in units[start : start + sizes[split]]:
                unit_split[str(unit)] = split
            start += sizes[split]

    unit_fold = _assign_folds(unit_class, unit_split, p, rng)
    table = index.copy()
    table["split"] = table[p.unit].map(unit_split)
    table["fold"] = table[p.unit].map(unit_fold).astype(int)
    table = table.sort_values("tile_id", kind="stable").reset_index(drop=True)
    logger.info(
        "Split %d tiles by %s (seed %d): %s",
        len(table),
        p.unit,
        p.seed,
        table["split"].value_counts().reindex(SPLITS, fill_value=0).to_dict(),
    )
    return table.loc[:, list(SPLIT_COLUMNS)]


def _assign_folds(
    unit_class: pd.Series,
    unit_split: Mapping[str, str],
    p: SplittingParams,
    rng: np.random.Generator,
) -> dict[str, int]:
    """Fold per unit: -1 for test; round-robin per class over the rest, continuing across classes
    so that fold sizes stay even when classes have few units each."""
    folds = {u: -1 for u, s in unit_split.items() if s == "test"}
    pool = [u for u, s in unit_split.items() if s != "test"]
    if p.n_folds <= 1:
        return {**folds, **dict.fromkeys(pool, 0)}
    if len(pool) < p.n_folds:
        raise DataError(
            f"splitting.n_folds is {p.n_folds} but only {len(pool)} {p.unit} value(s) are outside "
            "the test split; lower n_folds."
        )
    turn = 0
    for label in sorted(unit_class.unique()):
        units = sorted(u for u in pool if unit_class[u] == label)
        if len(units) < p.n_folds:
            logger.warning(
                "Class '%s' has %d non-test %s value(s) for %d folds: some folds will have no "
                "'%s' to validate on.",
                label,
                len(units),
                p.unit,
                p.n_folds,
                label,
            )
        for unit in np.array(units)[rng.permutation(len(units))]:
            folds[str(unit)] = turn % p.n_folds
            turn += 1
    return folds


def check_no_leakage(split_table: pd.DataFrame, params: SplittingParams) -> pd.DataFrame:
    """Fails the run if a unit sits in two splits or two folds; returns the table unchanged.

    It runs between splitting and saving, so a leaky table is never written. For strategy
    ``image`` it checks images and warns that patients may still leak, which is the point of
    keeping that strategy only for comparison.
    """
    p = params
    missing = [c for c in SPLIT_COLUMNS if c not in split_table.columns]
    if missing:
        raise DataError(f"The split table lacks column(s) {missing}.")
    bad_splits = sorted(set(split_table["split"].astype(str)) - set(SPLITS))
    if bad_splits:
        raise DataError(f"The split table has unknown split name(s) {bad_splits}.")
    if split_table["tile_id"].duplicated().any():
        dup = split_table["tile_id"][split_table["tile_id"].duplicated()].unique()[:10]
        raise DataError(f"The split table lists tile(s) twice: tile_id {list(dup)}.")

    table = split_table.assign(
        group=split_table["group"].astype(str), image_path=split_table["image_path"].astype(str)
    )
    leaks = _units_in_several(table, p.unit, "split")
    if leaks:
        raise DataError(
            f"Leakage: {len(leaks)} {p.unit} value(s) appear in more than one split, so the "
            f"model would be tested on data it trained on: {_describe(leaks)}."
        )
    fold_leaks = _units_in_several(table, p.unit, "fold")
    if fold_leaks:
        raise DataError(
            f"Leakage: {len(fold_leaks)} {p.unit} value(s) appear in more than one "
            f"cross-validation fold: {_describe(fold_leaks)}."
        )
    is_test = table["split"] == "test"
    if (table.loc[is_test, "fold"] != -1).any() or (table.loc[~is_test, "fold"] < 0).any():
        raise DataError(
            "The split table's folds are inconsistent: test rows must have fold -1 "
            "and only test rows may."
        )
    if p.strategy == "image":
        shared = _units_in_several(table, "group", "split")
        logger.warning(
            "Strategy 'image' splits per image, as the study did: %d of %d patient group(s) have "
            "images in more than one split, so test scores may be optimistic.",
            len(shared),
            table["group"].nunique(),
        )
    missing_classes = {
        s: sorted(set(table["label"]) - set(table.loc[table["split"] == s, "label"]))
        for s in table["split"].unique()
    }
    for split, labels in missing_classes.items():
        if labels:
            logger.warning("Split '%s' has no tiles of class(es) %s.", split, labels)
    logger.info("No %s appears in two splits or two folds.", p.unit)
    return split_table


def _units_in_several(table: pd.DataFrame, unit: str, column: str) -> dict[str, list[Any]]:
    spread = table.groupby(unit)[column].unique()
    return {str(u): sorted(v) for u, v in spread.items() if len(v) > 1}


def _describe(leaks: Mapping[str, list[Any]], limit: int = 5) -> str:
    shown = "; ".join(f"'{u}' in {v}" for u, v in list(leaks.items())[:limit])
    return shown + (f"; and {len(leaks) - limit} more" if len(leaks) > limit else "")


def summarise_split(split_table: pd.DataFrame) -> pd.DataFrame:
    """Images, groups and tiles per class per split, plus each split's share of a class's tiles,
    so a reviewer sees at a glance whether every class is represented everywhere."""
    table = split_table.assign(label=split_table["label"].astype(str))
    summary = (
        table.groupby(["split", "label"])
        .agg(
            groups=("group", "nunique"), images=("image_path", "nunique"), tiles=("tile_id", "size")
        )
        .reset_index()
    )
    splits = [s for s in SPLITS if s in set(table["split"])]
    labels = sorted(table["label"].unique())
    full = pd.MultiIndex.from_product([splits, labels], names=["split", "label"])
    summary = summary.set_index(["split", "label"]).reindex(full, fill_value=0).reset_index()
    class_tiles = table.groupby("label").size()
    summary["tile_share"] = (summary["tiles"] / summary["label"].map(class_tiles)).round(4)
    return summary
