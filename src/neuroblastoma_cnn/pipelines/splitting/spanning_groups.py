"""Patient groups that span classes: StratifiedGroupKFold folds, whole folds to test and
validation, chosen to match the target shares best.

Kept apart from ``nodes.py``: a search over fold counts and fold choices with its own limits,
only used when some group holds tiles of several classes.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from neuroblastoma_cnn.core.errors import DataError
from neuroblastoma_cnn.core.group_folds import fold_of_groups, stratified_group_folds
from neuroblastoma_cnn.params import SplittingParams

from .allocation import _round_half_up, fold_pool, target_shares

#: Logged under the node module's name, as before the split (log filters and tests see it).
logger = logging.getLogger("neuroblastoma_cnn.pipelines.splitting.nodes")

#: Most folds dealt when groups span classes, and most ways of giving folds to test and
#: validation tried (more folds match odd fractions better, but each fold is less balanced).
MAX_FOLDS = 20
MAX_FOLD_CHOICES = 2_000
MAX_SGKF_ROWS = 20_000


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
    unit_codes = pd.factorize(units, sort=True)[0]
    label_codes = pd.factorize(labels, sort=True)[0]
    return fold_of_groups(stratified_group_folds(label_codes, unit_codes, n_splits, seed), units)


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
    best = _best_dealing(index, _fold_plans(len(units), p), p)
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


def _fold_plans(n_units: int, p: SplittingParams) -> dict[int, tuple[int, int]]:
    """``{K: (test folds, validation folds)}`` for every fold count worth dealing: 2 to
    min(units, MAX_FOLDS); with more units than MAX_FOLDS (every fold then mixes the classes),
    only the K whose whole folds best match the fractions."""
    plans = {k: plan for k in range(2, min(n_units, MAX_FOLDS) + 1)
             if (plan := _fold_counts(k, p)) is not None}
    if n_units > MAX_FOLDS:
        error = {k: abs(t / k - p.test_fraction) + abs(v / k - p.validation_fraction)
                 for k, (t, v) in plans.items()}
        plans = {k: plan for k, plan in plans.items() if error[k] <= min(error.values()) + 1e-9}
    return plans


def _best_dealing(
    index: pd.DataFrame, plans: Mapping[int, tuple[int, int]], p: SplittingParams
) -> tuple[tuple[int, float], int, dict[str, int], set[int], set[int]] | None:
    """Deals the units into each plan's K folds (seeded) and keeps the best choice of test and
    validation folds over all K (fewer folds on a tie): ``(score, K, fold per unit, test
    folds, validation folds)``, or None if every choice leaves a split without units."""
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
    return best


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
    folds, pool = fold_pool(unit_split, p)
    if p.n_folds <= 1:
        return {**folds, **dict.fromkeys(pool, 0)}
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
