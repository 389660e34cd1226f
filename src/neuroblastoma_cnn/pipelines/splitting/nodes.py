"""Which tiles train, validate and test the models, decided per patient (or per image).

Tiles of one patient are strongly correlated, so a split that lets a patient's tiles land in both
train and test measures memory of the patient, not generalisation. The default strategy therefore
allocates whole groups (patients, slides) to splits so that every class is represented in every
split. The study's per-image split is kept as strategy ``image`` to compare against.

When every unit (group for ``patient``, image for ``image``) holds one class, allocation is per
class over its units:

* units are shuffled with the seed, then ``round(test_fraction * n)`` go to test and
  ``round(validation_fraction * n)`` to validation, each at least one when its fraction is above
  zero, and at least one unit stays in train. Fractions are therefore fractions of a class's
  patients (or images), not of its tiles; the summary reports the resulting tile shares.
* a class with fewer units than splits to fill (three with the default fractions) is an error
  naming the class, since one of its splits would be empty.
* cross-validation folds (column ``fold``) are assigned over the train and validation units,
  round-robin per class after a seeded shuffle, so each fold gets a near-equal share of every
  class's units; test rows get fold -1.

When groups span classes (a slide with tumour and stroma tiles, a patient with images of several
grades), no per-class allocation exists: moving a group moves tiles of all its classes. Then
scikit-learn's ``StratifiedGroupKFold`` (seeded) deals the groups into K folds whose class
distributions are as alike as it can make them, whole folds go to test and validation
(``round(fraction * K)``, at least one each: 2 test and 1 validation fold of 10 for 0.2 / 0.1),
and of every fold count K up to the number of groups (at most 20; with more groups, the K that
matches the fractions best) and every way of choosing those folds, the one is kept that leaves
the fewest classes missing from a split, then is closest to the target shares of every class's
tiles. Fractions are then fractions of each class's *tiles*. (With few groups this search
tries nearly every assignment, so the seed rarely changes the split.) Only three groups are
needed in all, not three per class; a class found in fewer groups than splits cannot be in
every split, which the leakage check reports. Cross-validation folds are
``StratifiedGroupKFold`` folds of the non-test tiles. Either way, the split summary gives each
split's share of every class's tiles beside its target (``target_share``, ``share_gap``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pandas as pd

from neuroblastoma_cnn.core.errors import DataError
from neuroblastoma_cnn.datasets import TileStore
from neuroblastoma_cnn.params import SplittingParams

from .allocation import _split_per_class, target_shares
from .spanning_groups import MAX_FOLD_CHOICES, MAX_FOLDS, MAX_SGKF_ROWS, _split_spanning_groups

logger = logging.getLogger(__name__)

#: The nodes, and the names tests and other modules reach through this module (the
#: arithmetic of each case lives in ``allocation`` and ``spanning_groups``).
__all__ = [
    "INDEX_COLUMNS", "MAX_FOLDS", "MAX_FOLD_CHOICES", "MAX_SGKF_ROWS", "SPLITS", "SPLIT_COLUMNS",
    "check_no_leakage", "split_tiles", "summarise_split", "target_shares",
]

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


def _mixed_units(index: pd.DataFrame, unit: str) -> list[str]:
    """Units whose tiles carry more than one class (sorted)."""
    n_labels = index.groupby(unit)["label"].nunique()
    return sorted(map(str, n_labels.index[n_labels > 1]))


def split_tiles(tiles: TileStore | pd.DataFrame, params: SplittingParams) -> pd.DataFrame:
    """Assigns every tile a split and a cross-validation fold, moving whole units (see module).

    Returns one row per tile, in tile order: tile_id, image_path, label, group, split, fold.
    """
    p = params
    index = _tile_index(tiles)
    mixed = _mixed_units(index, p.unit)
    if mixed:
        unit_split, unit_fold = _split_spanning_groups(index, mixed, p)
    else:
        unit_split, unit_fold = _split_per_class(index, p)
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


def check_no_leakage(split_table: pd.DataFrame, params: SplittingParams) -> pd.DataFrame:
    """Fails the run if a unit sits in two splits or two folds; returns the table unchanged.

    It runs between splitting and saving, so a leaky table is never written. For strategy
    ``image`` it checks images and warns that patients may still leak, which is the point of
    keeping that strategy only for comparison.
    """
    p = params
    _check_table(split_table)
    table = split_table.assign(
        group=split_table["group"].astype(str), image_path=split_table["image_path"].astype(str)
    )
    _check_units(table, p.unit)
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


def _check_table(split_table: pd.DataFrame) -> None:
    """The table's shape: every column, known split names, each tile once."""
    missing = [c for c in SPLIT_COLUMNS if c not in split_table.columns]
    if missing:
        raise DataError(f"The split table lacks column(s) {missing}.")
    bad_splits = sorted(set(split_table["split"].astype(str)) - set(SPLITS))
    if bad_splits:
        raise DataError(f"The split table has unknown split name(s) {bad_splits}.")
    if split_table["tile_id"].duplicated().any():
        dup = split_table["tile_id"][split_table["tile_id"].duplicated()].unique()[:10]
        raise DataError(f"The split table lists tile(s) twice: tile_id {list(dup)}.")


def _check_units(table: pd.DataFrame, unit: str) -> None:
    """No ``unit`` value in two splits or two folds; fold -1 for the test rows, and only them."""
    leaks = _units_in_several(table, unit, "split")
    if leaks:
        raise DataError(
            f"Leakage: {len(leaks)} {unit} value(s) appear in more than one split, so the "
            f"model would be tested on data it trained on: {_describe(leaks)}."
        )
    fold_leaks = _units_in_several(table, unit, "fold")
    if fold_leaks:
        raise DataError(
            f"Leakage: {len(fold_leaks)} {unit} value(s) appear in more than one "
            f"cross-validation fold: {_describe(fold_leaks)}."
        )
    is_test = table["split"] == "test"
    if (table.loc[is_test, "fold"] != -1).any() or (table.loc[~is_test, "fold"] < 0).any():
        raise DataError(
            "The split table's folds are inconsistent: test rows must have fold -1 "
            "and only test rows may."
        )


def _units_in_several(table: pd.DataFrame, unit: str, column: str) -> dict[str, list[Any]]:
    spread = table.groupby(unit)[column].unique()
    return {str(u): sorted(v) for u, v in spread.items() if len(v) > 1}


def _describe(leaks: Mapping[str, list[Any]], limit: int = 5) -> str:
    shown = "; ".join(f"'{u}' in {v}" for u, v in list(leaks.items())[:limit])
    return shown + (f"; and {len(leaks) - limit} more" if len(leaks) > limit else "")


def summarise_split(
    split_table: pd.DataFrame, params: SplittingParams | None = None
) -> pd.DataFrame:
    """Images, groups and tiles per class per split, plus each split's share of a class's tiles,
    so a reviewer sees at a glance whether every class is represented everywhere.

    With the parameters, also the split's target share (its fraction) and ``share_gap`` =
    tile share - target: how far the split is from the target for that class (fractions are of
    groups when each group holds one class, so tile shares can differ even then).
    """
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
    if params is not None:
        summary["target_share"] = summary["split"].map(target_shares(params)).round(4)
        summary["share_gap"] = (summary["tile_share"] - summary["target_share"]).round(4)
        worst = summary.loc[summary["share_gap"].abs().idxmax()]
        logger.info(
            "Split summary: largest gap from the target share is %+.3f ('%s' in %s: %.3f of its "
            "tiles, target %.3f)", worst["share_gap"], worst["label"], worst["split"],
            worst["tile_share"], worst["target_share"],
        )
    return summary
