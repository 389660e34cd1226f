"""One class per unit: each class's units dealt to the splits in exact fractions, and to folds
round-robin.

Kept apart from ``nodes.py``: the usual case's arithmetic (shares, rounding, folds), which the
spanning-groups case reuses for its targets.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from neuroblastoma_cnn.core.errors import DataError
from neuroblastoma_cnn.params import SplittingParams

#: Logged under the node module's name, as before the split (log filters and tests see it).
logger = logging.getLogger("neuroblastoma_cnn.pipelines.splitting.nodes")


def _unit_classes(index: pd.DataFrame, unit: str) -> pd.Series:
    """Each unit's class, for units that hold one class each."""
    return index.drop_duplicates(unit).set_index(unit)["label"]


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def target_shares(p: SplittingParams) -> dict[str, float]:
    """The share of every class's tiles (or units) each split should get."""
    return {"train": 1.0 - p.test_fraction - p.validation_fraction,
            "validation": p.validation_fraction, "test": p.test_fraction}


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


def fold_pool(unit_split: Mapping[str, str], p: SplittingParams
              ) -> tuple[dict[str, int], list[str]]:
    """``(folds, pool)``: fold -1 for every test unit, and the other units to share the folds;
    a DataError when there are fewer of them than folds."""
    folds = {u: -1 for u, s in unit_split.items() if s == "test"}
    pool = [u for u, s in unit_split.items() if s != "test"]
    if p.n_folds > 1 and len(pool) < p.n_folds:
        raise DataError(
            f"splitting.n_folds is {p.n_folds} but only {len(pool)} {p.unit} value(s) are outside "
            "the test split; lower n_folds."
        )
    return folds, pool


def _assign_folds(
    unit_class: pd.Series,
    unit_split: Mapping[str, str],
    p: SplittingParams,
    rng: np.random.Generator,
) -> dict[str, int]:
    """Fold per unit: -1 for test; round-robin per class over the rest, continuing across classes
    so that fold sizes stay even when classes have few units each."""
    folds, pool = fold_pool(unit_split, p)
    if p.n_folds <= 1:
        return {**folds, **dict.fromkeys(pool, 0)}
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
