"""A study's repeats: which patients validate and which tiles train in repeat ``r``.

The test split is the split table's own in every repeat, so every variant is scored on the same
held-out patients; what changes between repeats is the validation patients (and with them the
training patients) and the training seed. Every variant of a study gets the same repeats, so
comparisons are paired. Pure pandas/NumPy: no Kedro, no TensorFlow.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from neuroblastoma_cnn.core.errors import DataError, ParameterError

logger = logging.getLogger(__name__)


def available_repeats(split_table: pd.DataFrame, scheme: str) -> int | None:
    """How many distinct repeats the scheme can make (None: unlimited)."""
    if scheme == "folds":
        return int(split_table.loc[split_table["fold"] >= 0, "fold"].nunique())
    return None


def check_repeats(split_table: pd.DataFrame, scheme: str, repeats: int) -> None:
    """Fails before training when the split table cannot give ``repeats`` repeats."""
    limit = available_repeats(split_table, scheme)
    if limit is not None and repeats > limit:
        raise ParameterError(
            f"The study asks for {repeats} repeats on cross-validation folds, but the split "
            f"table has {limit} fold(s).",
            hint="lower study.repeats, raise splitting.n_folds and rerun data_processing, or "
                 "use study.repeat_scheme: seeded",
        )


def repeat_split_table(
    split_table: pd.DataFrame, scheme: str, repeat: int, seed: int, validation_fraction: float
) -> pd.DataFrame:
    """The split table of one repeat: test rows unchanged, the others train or validation.

    ``folds``: fold number ``repeat`` (in sorted order) validates; ``seeded``: a class-stratified
    draw of ``validation_fraction`` of each class's non-test patients, seeded by
    ``seed + repeat``; ``split``: the table as it is.
    """
    table = split_table.copy()
    if scheme == "split":
        return table
    non_test = table["split"] != "test"
    if scheme == "folds":
        folds = sorted(int(f) for f in table.loc[non_test & (table["fold"] >= 0), "fold"].unique())
        if repeat >= len(folds):
            raise ParameterError(f"Repeat {repeat} needs fold {repeat}, but the split table has "
                                 f"{len(folds)} fold(s).")
        validate = non_test & (table["fold"] == folds[repeat])
    elif scheme == "seeded":
        groups = draw_validation_groups(table.loc[non_test], seed + repeat, validation_fraction)
        validate = non_test & table["group"].astype(str).isin(groups)
    else:
        raise ParameterError(f"Unknown repeat scheme '{scheme}': use folds, seeded or split.")
    table.loc[non_test, "split"] = "train"
    table.loc[validate, "split"] = "validation"
    if not validate.any():
        raise DataError(f"Repeat {repeat} ({scheme}) has no validation tiles.")
    return table


def draw_validation_groups(rows: pd.DataFrame, seed: int, fraction: float) -> set[str]:
    """Per class (a group's majority label), round(fraction * n) groups, at least one, and
    always leaving one group to train; classes with a single group stay in training."""
    majority = (
        rows.assign(group=rows["group"].astype(str), label=rows["label"].astype(str))
        .groupby(["group", "label"]).size().rename("n").reset_index()
        .sort_values(["group", "n", "label"], ascending=[True, False, True])
        .drop_duplicates("group")
    )
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    for label, part in majority.groupby("label", sort=True):
        groups = sorted(part["group"])
        if len(groups) < 2:
            logger.warning("Class '%s' has one non-test patient: it stays in training in every "
                           "seeded repeat.", label)
            continue
        take = min(max(1, round(fraction * len(groups))), len(groups) - 1)
        chosen.update(rng.permutation(groups)[:take].tolist())
    return chosen


def training_tile_ids(train_index: pd.DataFrame, repeat_table: pd.DataFrame) -> list[int]:
    """Tiles of the augmented training store that may train in this repeat: those whose source
    tile is a training tile of the repeat (augmented copies follow their original)."""
    source = (train_index["source_tile_id"] if "source_tile_id" in train_index
              else train_index["tile_id"])
    allowed = set(repeat_table.loc[repeat_table["split"] == "train", "tile_id"].astype(int))
    keep = source.astype(int).isin(allowed)
    ids = train_index.loc[keep, "tile_id"].astype(int).tolist()
    if not ids:
        raise DataError("No training tiles are left in this repeat: the augmented training "
                        "store shares no patient with the repeat's training split.",
                        hint="rerun data_processing so that the stores and split table match")
    return ids
