"""Cross-validation folds of whole patients, and the split table each fold trains with.

Why patients: tiles, and images of one patient (or one slide), look alike; a fold that scored
images whose patient also trained would flatter the model, so folds move whole groups. Why a
validation part carved from the *training* folds: a fold that chose its epoch on the fold it is
scored on would select on its own test data. The outer test patients (the split table's
``test`` split) stay out of every fold, so the fold ensemble is scored on patients that none of
its members trained or chose an epoch on. Pure pandas/NumPy/scikit-learn: no Kedro, no Keras.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from neuroblastoma_cnn.core.errors import DataError, ParameterError
from neuroblastoma_cnn.core.group_folds import fold_of_groups, stratified_group_folds
from neuroblastoma_cnn.trials.repeats import draw_validation_groups

logger = logging.getLogger(__name__)

#: Roles of an image in the fold table.
CV, OUTER = "cv", "outer"
#: Split names inside one fold's table (``train`` and ``validation`` as the training node reads
#: them, ``test`` = the held-out fold, ``outer`` = the outer test patients).
HELD_OUT, OUTER_SPLIT = "test", "outer"
FOLD_COLUMNS = ["image_path", "label", "group", "role", "fold", "n_tiles"]


def group_labels(table: pd.DataFrame) -> pd.Series:
    """Each group's class: its most frequent tile label (ties: the first name in order)."""
    counts = (table.assign(group=table["group"].astype(str), label=table["label"].astype(str))
              .groupby(["group", "label"]).size().rename("n").reset_index()
              .sort_values(["group", "n", "label"], ascending=[True, False, True]))
    return counts.drop_duplicates("group").set_index("group")["label"]


def check_fold_count(labels: pd.Series, n_folds: int) -> None:
    """Fails, naming the class and the parameter, when a class has fewer groups than folds
    (a fold would then have no image of it, and its per-fold F1 would be undefined)."""
    per_class = labels.value_counts().sort_index()
    short = per_class[per_class < n_folds]
    if short.empty:
        return
    listed = ", ".join(f"'{label}' has {n}" for label, n in short.items())
    raise ParameterError(
        f"cross_validation.n_folds = {n_folds}, but {listed} patient group(s) in the folds "
        f"(the smallest class allows at most {int(per_class.min())} folds).",
        hint=f"set cross_validation.n_folds <= {int(per_class.min())}, add patients of that "
             "class, or set cross_validation.outer_test: false to fold every patient")


def assign_folds(split_table: pd.DataFrame, n_folds: int, seed: int,
                 outer_test: bool) -> pd.DataFrame:
    """One row per image: its role (``cv`` or ``outer``) and fold (-1 for outer), groups kept
    whole and class shares kept close (scikit-learn's ``StratifiedGroupKFold`` on groups)."""
    table = split_table.assign(group=split_table["group"].astype(str),
                               label=split_table["label"].astype(str))
    outer = table["split"].eq("test") if outer_test else pd.Series(False, index=table.index)
    folded = table.loc[~outer]
    labels = group_labels(folded)
    check_fold_count(labels, n_folds)
    groups = labels.index.to_numpy()
    fold_of = fold_of_groups(stratified_group_folds(labels.to_numpy(), groups, n_folds, seed),
                             groups)
    images = (table.groupby("image_path", sort=True)
              .agg(label=("label", "first"), group=("group", "first"),
                   n_tiles=("tile_id", "size")).reset_index())
    is_outer = images["image_path"].isin(set(table.loc[outer, "image_path"]))
    images["role"] = np.where(is_outer, OUTER, CV)
    images["fold"] = images["group"].map(fold_of).fillna(-1).astype(int)  # outer: no fold
    _log_folds(images, n_folds)
    return images[FOLD_COLUMNS]


def _log_folds(images: pd.DataFrame, n_folds: int) -> None:
    cv = images[images["role"] == CV]
    for fold in range(n_folds):
        part = cv[cv["fold"] == fold]
        logger.info("Fold %d: %d images, %d groups (%s)", fold, len(part), part["group"].nunique(),
                    ", ".join(f"{k} {v}" for k, v in part["label"].value_counts().sort_index()
                              .items()))
    outer = images[images["role"] == OUTER]
    if len(outer):
        logger.info("Outer test part: %d images, %d groups (no fold trains on them)",
                    len(outer), outer["group"].nunique())


def check_folds(folds: pd.DataFrame, n_folds: int) -> None:
    """No group in two folds or in a fold and the outer part; every fold holds images."""
    roles = folds.assign(where=np.where(folds["role"] == OUTER, "outer",
                                        folds["fold"].astype(str)))
    spread = roles.groupby("group")["where"].nunique()
    leaking = sorted(spread[spread > 1].index)
    if leaking:
        raise DataError(f"Patient group(s) {', '.join(leaking[:5])} fall in several folds.")
    present = set(folds.loc[folds["role"] == CV, "fold"].astype(int))
    missing = sorted(set(range(n_folds)) - present)
    if missing:
        raise DataError(f"Fold(s) {missing} hold no image.",
                        hint="lower cross_validation.n_folds")


def fold_split_table(split_table: pd.DataFrame, folds: pd.DataFrame, fold: int, seed: int,
                     validation_fraction: float) -> pd.DataFrame:
    """The tile table fold ``fold`` trains with: its held-out fold is ``test``, the outer
    patients ``outer``, the rest ``train`` except a class-stratified draw of groups, seeded by
    ``seed + fold``, that is ``validation`` (where the fold chooses its epoch)."""
    where = folds.set_index("image_path")
    table = split_table.copy()
    paths = table["image_path"]
    role = paths.map(where["role"])
    fold_of = paths.map(where["fold"])
    if role.isna().any():
        raise DataError("The split table and the fold table name different images: rerun the "
                        "cross-validation from the data stages.")
    training = (role == CV) & (fold_of != fold)
    table["split"] = np.where(role == OUTER, OUTER_SPLIT,
                              np.where(fold_of == fold, HELD_OUT, "train"))
    chosen = draw_validation_groups(table.loc[training], seed + fold, validation_fraction)
    table.loc[training & table["group"].astype(str).isin(chosen), "split"] = "validation"
    if not (table["split"] == "validation").any():
        raise DataError(f"Fold {fold} has no validation group: every class has a single "
                        "training group.", hint="lower cross_validation.n_folds")
    return table


def as_evaluated(table: pd.DataFrame, split: str) -> pd.DataFrame:
    """The fold table with ``split`` renamed ``test`` (what the evaluation node predicts) and
    every other row ``train``."""
    return table.assign(split=np.where(table["split"] == split, "test", "train"))
