"""Folds of whole patient groups: the one wrapper of scikit-learn's ``StratifiedGroupKFold`` and
the one check that no group sits on both sides of a fold.

Why one: tiles and images of one patient look alike, so every grouped split of this project
(the data split when groups span classes, the scikit-learn heads' model selection, the
cross-validation folds, the classical floor's inner folds) deals whole groups into folds with
class shares kept close, seeded, and must never let a patient train and score in one fold.
Each caller shapes its own rows (one per tile, per image or per group) and reads the folds its
own way; the dealing and the leak check are here.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from neuroblastoma_cnn.core.errors import DataError

#: ``(train_rows, test_rows)`` index arrays, one pair per fold.
Folds = list[tuple[np.ndarray, np.ndarray]]


def stratified_group_folds(labels: Sequence[Any] | np.ndarray, groups: Sequence[Any] | np.ndarray,
                           n_splits: int, seed: int | None, shuffle: bool = True) -> Folds:
    """``StratifiedGroupKFold(n_splits)`` over the rows (shuffled with ``seed`` when ``shuffle``),
    leak-checked. The folds depend only on each group's count of rows per class, so the same
    table and seed give the same folds whatever the row order."""
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=shuffle,
                                    random_state=seed if shuffle else None)
    with warnings.catch_warnings():
        # "The least populated class in y has only n members": expected with few groups; a
        # class missing from a fold is each caller's to report, in its own terms.
        warnings.filterwarnings("ignore", message="The least populated class")
        folds = list(splitter.split(np.zeros(len(labels)), labels, groups))
    check_group_folds(folds, groups)
    return folds


def fold_of_groups(folds: Folds, groups: Sequence[Any] | np.ndarray) -> dict[str, int]:
    """``{group: fold}``: the fold whose test rows hold each group."""
    names = np.asarray([str(g) for g in groups])
    fold_of: dict[str, int] = {}
    for fold, (_, test) in enumerate(folds):
        fold_of.update(dict.fromkeys(np.unique(names[test]).tolist(), fold))
    return fold_of


def check_group_folds(folds: Folds, groups: Sequence[Any] | np.ndarray, where: str = "CV",
                      hint: str | None = None) -> None:
    """Raises :class:`DataError` if a fold has one group among both its training and its test
    rows: its scores would reward memorising a patient."""
    names = np.asarray([str(g) for g in groups])
    for i, (train, test) in enumerate(folds):
        shared = set(names[train].tolist()) & set(names[test].tolist())
        if shared:
            raise DataError(f"{where} fold {i} has group(s) {sorted(shared)[:5]} on both sides: "
                            "its scores would reward memorising a patient.", hint=hint)
