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

import itertools
import logging
import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from neuroblastoma_cnn.core.errors import DataError
from neuroblastoma_cnn.core.params import SplittingParams
from neuroblastoma_cnn.datasets import TileStore

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
INDEX_COLUMNS = ("tile_id", "image_path", "label", "group")
SPLIT_COLUMNS = ("tile_id", "image_path", "label", "group", "split", "fold")
#: Most folds dealt when groups span classes, and most ways of giving folds to test and
#: validation tried (more folds match odd fractions better, but each fold is less balanced).
MAX_FOLDS = 20
MAX_FOLD_CHOICES = 2_000
MAX_SGKF_ROWS = 20_000


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
    """Each unit's class, for units that hold one class each."""
    return index.drop_duplicates(unit).set_index(unit)["label"]


def _mixed_units(index: pd.DataFrame, unit: str) -> list[str]:
    """Units whose tiles carry more than one class (sorted)."""
    n_labels = index.groupby(unit)["label"].nunique()
    return sorted(map(str, n_labels.index[n_labels > 1]))


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


def _split_per_class(
    index: pd.DataFrame, p: SplittingParams
) -> tuple[dict[str, str], dict[str, int]]:
    """One class per unit: each class's units are allocated on their own (exact fractions)."""
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
    return unit_split, _assign_folds(unit_class, unit_split, p, rng)


def target_shares(p: SplittingParams) -> dict[str, float]:
    """The share of every class's tiles (or units) each split should get."""
    return {"train": 1.0 - p.test_fraction - p.validation_fraction,
            "validation": p.validation_fraction, "test": p.test_fraction}


def _fold_counts(k: int, p: SplittingParams) -> tuple[int, int] | None:
    """``(test folds, validation folds)`` of K folds closest to the fractions, each at least one
    when its fraction is above zero; None when nothing would be left to train on or there are
    too many ways to choose them."""
    n_test = max(1, _round_half_up(p.test_fraction * k)) if p.test_fraction else 0
    n_val = max(1, _round_half_up(p.validation_fraction * k)) if p.validation_fraction else 0
    if n_test + n_val >= k:
        return None
    if math.comb(k, n_test) * math.comb(k - n_test, n_val) > MAX_FOLD_CHOICES:
        return None
    return n_test, n_val


def _sgkf_folds(frame: pd.DataFrame, unit: str, n_splits: int, seed: int) -> dict[str, int]:
    """The fold of every unit, from seeded StratifiedGroupKFold over the frame's tiles.

    The folds depend only on each unit's tile count per class, so the call gets one row per
    (unit, class) repeated that many times, with counts scaled down (never to zero) when there
    are more than MAX_SGKF_ROWS tiles: scikit-learn walks every row in Python per fold.
    """
    pairs = frame.groupby([unit, "label"]).size()
    scale = max(1, math.ceil(int(pairs.sum()) / MAX_SGKF_ROWS))
    repeats = np.ceil(pairs.to_numpy() / scale).astype(int)
    units = np.repeat(pairs.index.get_level_values(0).astype(str).to_numpy(), repeats)
    labels = np.repeat(pairs.index.get_level_values(1).astype(str).to_numpy(), repeats)
    unit_codes, unit_names = pd.factorize(units, sort=True)
    label_codes = pd.factorize(labels, sort=True)[0]
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    folds: dict[str, int] = {}
    with warnings.catch_warnings():
        # "The least populated class in y has only n members": expected with few groups;
        # classes missing from a split are reported by the leakage check instead.
        warnings.filterwarnings("ignore", message="The least populated class")
        for k, (_, rows) in enumerate(
            splitter.split(np.zeros(len(unit_codes)), label_codes, unit_codes)
        ):
            folds.update(dict.fromkeys(map(str, unit_names[np.unique(unit_codes[rows])]), k))
    return folds


def _split_spanning_groups(
    index: pd.DataFrame, mixed: list[str], p: SplittingParams
) -> tuple[dict[str, str], dict[str, int]]:
    """Groups span classes: StratifiedGroupKFold folds, whole folds to test and validation.

    Every fold count K from 2 to min(groups, MAX_FOLDS) is dealt (seeded) and every way of
    giving whole folds to test and validation scored; the best overall is kept (fewer folds
    on a tie: each is then closer to the overall class mix). With more groups than MAX_FOLDS,
    only the K whose whole folds best match the fractions is dealt (10 for 0.2 / 0.1).
    """
    units = sorted(map(str, index[p.unit].unique()))
    needed = [s for s, f in (("validation", p.validation_fraction), ("test", p.test_fraction))
              if f > 0]
    kind = "patient group" if p.strategy == "patient" else "image"
    if len(units) < 1 + len(needed):
        splits = " and ".join([", ".join(["train", *needed[:-1]]), needed[-1]])
        raise DataError(
            f"Only {len(units)} {kind}(s) in all; strategy '{p.strategy}' needs at least "
            f"{1 + len(needed)} so that {splits} each get one. Add data, or set the fraction "
            "of a split you do not need to 0."
        )
    plans = {k: plan for k in range(2, min(len(units), MAX_FOLDS) + 1)
             if (plan := _fold_counts(k, p)) is not None}
    if len(units) > MAX_FOLDS:  # many groups: every fold mixes the classes; match the fractions
        error = {k: abs(t / k - p.test_fraction) + abs(v / k - p.validation_fraction)
                 for k, (t, v) in plans.items()}
        plans = {k: plan for k, plan in plans.items() if error[k] <= min(error.values()) + 1e-9}
    best: tuple[tuple[int, float], int, dict[str, int], set[int], set[int]] | None = None
    for k, plan in plans.items():
        unit_fold = _sgkf_folds(index, p.unit, k, p.seed)
        counts = (index.assign(fold=index[p.unit].map(unit_fold))
                  .groupby(["fold", "label"]).size().unstack(fill_value=0)
                  .reindex(range(k), fill_value=0))
        fold_units = pd.Series(unit_fold).value_counts().reindex(range(k), fill_value=0)
        choice = _best_fold_choice(counts.to_numpy(), fold_units.to_numpy(), *plan, p)
        if choice is not None and (best is None or choice[0] < best[0]):
            best = (choice[0], k, unit_fold, choice[1], choice[2])
    if best is None:
        raise DataError(
            f"Cannot give train, {' and '.join(needed)} a {kind} each: StratifiedGroupKFold "
            f"left folds empty. Add data, or set the fraction of a split you do not need to 0."
        )
    (missing, gap), k, unit_fold, test_folds, val_folds = best
    logger.info(
        "%d of %d %s(s) hold tiles of several classes (e.g. %s): split with StratifiedGroupKFold "
        "into %d folds (%d test, %d validation) so that every %s stays in one split; "
        "%d (split, class) pair(s) without tiles, total distance from the target shares %.3f.",
        len(mixed), len(units), kind, ", ".join(mixed[:3]), k, len(test_folds), len(val_folds),
        kind, missing, gap,
    )
    fold_split = {f: "test" if f in test_folds else "validation" if f in val_folds else "train"
                  for f in range(k)}
    unit_split = {u: fold_split[f] for u, f in unit_fold.items()}
    return unit_split, _assign_folds_spanning(index, unit_split, p)


def _best_fold_choice(
    counts: np.ndarray, fold_units: np.ndarray, n_test: int, n_val: int, p: SplittingParams
) -> tuple[tuple[int, float], set[int], set[int]] | None:
    """Test and validation folds: fewest (split, class) pairs without tiles, then the smallest
    total distance of every class's tile shares from the targets. None if every choice leaves a
    split without units."""
    n_folds = len(counts)
    totals = counts.sum(axis=0).astype(float)
    targets = target_shares(p)
    best: tuple[tuple[int, float], set[int], set[int]] | None = None
    for test in itertools.combinations(range(n_folds), n_test):
        rest = [f for f in range(n_folds) if f not in test]
        for val in itertools.combinations(rest, n_val):
            parts = {"test": list(test), "validation": list(val),
                     "train": [f for f in rest if f not in val]}
            if any(fold_units[folds].sum() == 0 for s, folds in parts.items()
                   if targets[s] > 0):
                continue
            missing, gap = 0, 0.0
            for split, folds in parts.items():
                if targets[split] <= 0:
                    continue
                tiles = counts[folds].sum(axis=0)
                missing += int((tiles == 0).sum())
                gap += float(np.abs(tiles / totals - targets[split]).sum())
            score = (missing, round(gap, 9))
            if best is None or score < best[0]:
                best = (score, set(test), set(val))
    return best


def _assign_folds_spanning(
    index: pd.DataFrame, unit_split: Mapping[str, str], p: SplittingParams
) -> dict[str, int]:
    """Cross-validation folds over the non-test units when groups span classes: -1 for test,
    StratifiedGroupKFold folds of the train and validation tiles for the rest."""
    folds = {u: -1 for u, s in unit_split.items() if s == "test"}
    pool = [u for u, s in unit_split.items() if s != "test"]
    if p.n_folds <= 1:
        return {**folds, **dict.fromkeys(pool, 0)}
    if len(pool) < p.n_folds:
        raise DataError(
            f"splitting.n_folds is {p.n_folds} but only {len(pool)} {p.unit} value(s) are outside "
            "the test split; lower n_folds."
        )
    frame = index[index[p.unit].isin(pool)]
    folds.update(_sgkf_folds(frame, p.unit, p.n_folds, p.seed))
    present = frame.assign(fold=frame[p.unit].map(folds)).groupby("label")["fold"].nunique()
    for label, n in present.items():
        if n < p.n_folds:
            logger.warning(
                "Class '%s' is in %d of %d cross-validation folds: some folds will have no "
                "'%s' to validate on.", label, n, p.n_folds, label,
            )
    return folds


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
