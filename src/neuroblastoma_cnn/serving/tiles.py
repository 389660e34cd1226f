"""Tiles to the model: batched prediction of many files, and the tables it fills.

The fixed-size batches (shared by images, padded at the end), slides streamed chunk by chunk
and test-time augmentation are one mechanism behind :func:`predict_files`, which the predict
pipeline, the command line and the served model all call.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neuroblastoma_cnn.analysis.conformal import add_prediction_sets
from neuroblastoma_cnn.analysis.predictions import (
    FLAG_COLUMNS,
    aggregate_image_probabilities,
    model_probabilities,
    prediction_columns,
    probability_column,
)
from neuroblastoma_cnn.analysis.tta import TTA_PREFIX
from neuroblastoma_cnn.images.decoding import ImageRejected
from neuroblastoma_cnn.images.online_augmentation import N_DIHEDRAL, dihedral_numpy
from neuroblastoma_cnn.images.preprocessing import preprocessing_of
from neuroblastoma_cnn.models.families import WHOLE_IMAGE_KINDS
from neuroblastoma_cnn.params import PredictParams

from .images import PreparedImage, Rejection, _prepared_in_order
from .slide_tiles import SlideTiles, add_shares, log_tile_progress

logger = logging.getLogger(__name__)


def model_source(model: Any) -> str:
    """Which model this is, as the tables and logs name it."""
    return str(getattr(model, "model_source", None) or getattr(model, "name", "model"))


@dataclass
class _Batcher:
    """Feeds tiles to the model in fixed-size batches, in arrival order."""

    model: Any
    batch_size: int
    tta: bool = False
    pending: list[np.ndarray] = field(default_factory=list)
    n_pending: int = 0
    results: list[np.ndarray] = field(default_factory=list)
    tta_results: list[np.ndarray] = field(default_factory=list)
    added: int = 0
    #: ``(start, stop)`` of tiles added but not wanted (a slide that failed half-way).
    dropped: list[tuple[int, int]] = field(default_factory=list)

    def add(self, tiles: np.ndarray) -> None:
        self.added += len(tiles)
        self.pending.append(tiles)
        self.n_pending += len(tiles)
        while self.n_pending >= self.batch_size:
            stacked = np.concatenate(self.pending)
            self._run(stacked[: self.batch_size])
            rest = stacked[self.batch_size :]
            self.pending, self.n_pending = ([rest] if len(rest) else []), len(rest)

    def finish(self) -> np.ndarray:
        if self.n_pending:
            stacked = np.concatenate(self.pending)
            padding = np.zeros((self.batch_size - len(stacked), *stacked.shape[1:]), stacked.dtype)
            self._run(np.concatenate([stacked, padding]), keep=len(stacked))
            self.pending, self.n_pending = [], 0
        if not self.results:
            return np.zeros((0, 0))
        return self._kept(np.concatenate(self.results))

    def finish_tta(self) -> np.ndarray:
        """The test-time-augmented probabilities (after :meth:`finish`)."""
        return (self._kept(np.concatenate(self.tta_results)) if self.tta_results
                else np.zeros((0, 0)))

    def _kept(self, prob: np.ndarray) -> np.ndarray:
        drop = [i for start, stop in self.dropped for i in range(start, stop)]
        return np.delete(prob, drop, axis=0) if drop else prob

    def _run(self, batch: np.ndarray, keep: int | None = None) -> None:
        prob = model_probabilities(self.model, self.model.predict_on_batch(
            batch.astype(np.float32)))
        self.results.append(prob if keep is None else prob[:keep])
        if self.tta:
            count = N_DIHEDRAL if batch.shape[1] == batch.shape[2] else 4
            total = prob.copy()  # symmetry 0 is the identity
            for k in range(1, count):
                variant = dihedral_numpy(batch, k).astype(np.float32)
                total += model_probabilities(self.model, self.model.predict_on_batch(variant))
            total /= count
            self.tta_results.append(total if keep is None else total[:keep])


def predict_files(
    files: Sequence[tuple[str, Path]],
    model: Any,
    params: PredictParams,
    progress: Callable[[int], Any] | None = None,
    tile_progress: Callable[[str, int], Callable[[int], Any]] = log_tile_progress,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Classifies image files; returns ``(predictions, tile_predictions)``.

    ``files`` are ``(name, path)`` pairs; ``name`` is what the tables show. ``predictions`` has
    one row per file, in order: ``file, predicted, prob_<class>..., n_tiles, low_confidence,
    mostly_background, rejected, reason, width, height, model``. ``tile_predictions`` has one
    row per tile used: ``file, x, y, tissue_fraction, prob_<class>...``. ``progress(1)`` is
    called after each file. Slides (:mod:`neuroblastoma_cnn.images.slides`) are streamed to the
    model a chunk of tiles at a time, with ``tile_progress(file, n_tiles)`` called on each chunk's
    size; with a slide among the files, tiles also get ``level, tile_px, mpp`` and predictions
    ``share_<class>``.
    """
    if getattr(model, "kind", None) in WHOLE_IMAGE_KINDS:  # whole images, no tiles
        from .classical import predict_classical_files  # noqa: PLC0415  (no cycle at import)

        return predict_classical_files(files, model, params, progress)
    preprocessing = preprocessing_of(model)
    settings = params
    source = model_source(model)
    classes = list(preprocessing.classes)
    prob_cols = [probability_column(c) for c in classes]
    batcher = _Batcher(model, settings.batch_size, tta=settings.tta)
    outcomes: list[PreparedImage | Rejection] = []
    tile_meta: dict[str, list[Any]] = {"file": [], "x": [], "y": [], "tissue_fraction": []}
    started = time.perf_counter()
    for prepared in _prepared_in_order(files, preprocessing, settings):
        outcome = prepared
        if isinstance(prepared, SlideTiles):
            outcome = _stream_slide(prepared, batcher, tile_meta, tile_progress)
        elif isinstance(outcome, PreparedImage):
            batcher.add(outcome.tiles)
            _add_tile_rows(tile_meta, outcome.file, outcome.positions, outcome.fractions)
            outcome.tiles = outcome.tiles[:0]  # pixels no longer needed
        outcomes.append(outcome)
        if progress is not None:
            progress(1)
    tiles = _tile_table(tile_meta, batcher, prob_cols, settings.tta)
    predictions = add_prediction_sets(
        _prediction_table(outcomes, tiles, classes, settings, source),
        preprocessing.conformal, classes)
    _log_summary(predictions, len(tiles), time.perf_counter() - started, source)
    return predictions, tiles


def _tile_table(tile_meta: dict[str, list[Any]], batcher: _Batcher, prob_cols: list[str],
                tta: bool) -> pd.DataFrame:
    """One row per tile predicted: its position and probabilities (and the TTA ones)."""
    prob = batcher.finish()
    tiles = pd.DataFrame(tile_meta)
    for i, column in enumerate(prob_cols):
        tiles[column] = prob[:, i] if len(tiles) else pd.Series(dtype=float)
    if tta:
        tta_prob = batcher.finish_tta()
        for i, column in enumerate(prob_cols):
            tiles[TTA_PREFIX + column] = tta_prob[:, i] if len(tiles) else pd.Series(dtype=float)
    return tiles


def _prediction_table(outcomes: Sequence[PreparedImage | Rejection], tiles: pd.DataFrame,
                      classes: list[str], settings: PredictParams, source: str) -> pd.DataFrame:
    """One row per file, in order: the image probabilities (mean of its tiles'), or why it
    was rejected; with slide shares and TTA columns when they apply."""
    images = (
        aggregate_image_probabilities(tiles.assign(image_path=tiles["file"], label="", group=""))
        .set_index("image_path")
        if len(tiles) else pd.DataFrame()
    )
    rows = [_prediction_row(o, images, classes, settings, source) for o in outcomes]
    predictions = pd.DataFrame(rows, columns=prediction_columns(classes))
    if "level" in tiles.columns:
        add_shares(predictions, tiles, classes)
    if settings.tta:
        _add_tta_columns(predictions, tiles, classes)
    for column in FLAG_COLUMNS:
        predictions[column] = predictions[column].astype(bool)
    for column in ("n_tiles", "width", "height"):  # integers, empty for rejected files
        predictions[column] = predictions[column].astype("Int64")
    return predictions


SLIDE_TILE_COLUMNS = ("level", "tile_px", "mpp")


def _add_tile_rows(tile_meta: dict[str, list[Any]], file: str,
                   positions: Sequence[tuple[int, int]], fractions: Sequence[float],
                   **slide: Any) -> None:
    """One row per tile; slide columns appear with the first slide (crops' cells empty)."""
    tile_meta["file"].extend([file] * len(positions))
    tile_meta["x"].extend(x for x, _ in positions)
    tile_meta["y"].extend(y for _, y in positions)
    tile_meta["tissue_fraction"].extend(round(f, 4) for f in fractions)
    for column in SLIDE_TILE_COLUMNS if slide else ():
        tile_meta.setdefault(column, [None] * (len(tile_meta["file"]) - len(positions)))
    for column in SLIDE_TILE_COLUMNS:
        if column in tile_meta:
            value = slide.get(column)
            tile_meta[column].extend([value] * (len(tile_meta["file"]) - len(tile_meta[column])))


def _stream_slide(plan: SlideTiles, batcher: _Batcher, tile_meta: dict[str, list[Any]],
                  tile_progress: Callable[[str, int], Callable[[int], Any]]
                  ) -> PreparedImage | Rejection:
    """Feeds one slide's tiles to the model chunk by chunk; its row, with no pixels kept. A
    slide that cannot be read to the end is rejected and its tiles already predicted dropped."""
    advance = tile_progress(plan.file, len(plan.positions))
    start = batcher.added
    try:
        for chunk in plan.chunks():
            batcher.add(chunk)
            advance(len(chunk))
    except ImageRejected as exc:
        batcher.dropped.append((start, batcher.added))
        return Rejection(plan.file, exc.reason)
    _add_tile_rows(tile_meta, plan.file, plan.positions, plan.fractions, level=plan.level,
                   tile_px=plan.tile_px, mpp=plan.mpp)
    return PreparedImage(plan.file, np.zeros((0, 1, 1, 3), np.uint8), plan.positions,
                         plan.fractions, plan.mostly_background, plan.width, plan.height)


def _prediction_row(
    outcome: PreparedImage | Rejection,
    images: pd.DataFrame,
    classes: list[str],
    settings: PredictParams,
    source: str,
) -> dict[str, Any]:
    if isinstance(outcome, Rejection):
        return {"file": outcome.file, "predicted": "", "n_tiles": 0, "low_confidence": False,
                "mostly_background": False, "rejected": True, "reason": outcome.reason,
                "width": None, "height": None, "model": source,
                **{probability_column(c): np.nan for c in classes}}
    image = images.loc[outcome.file]
    prob = np.array([float(image[probability_column(c)]) for c in classes])
    best = int(prob.argmax())
    return {
        "file": outcome.file, "predicted": classes[best],
        **{probability_column(c): p for c, p in zip(classes, prob, strict=True)},
        "n_tiles": int(image["n_tiles"]),
        "low_confidence": bool(prob[best] < settings.min_confidence),
        "mostly_background": outcome.mostly_background, "rejected": False, "reason": "",
        "width": outcome.width, "height": outcome.height, "model": source,
    }


def _add_tta_columns(predictions: pd.DataFrame, tiles: pd.DataFrame, classes: list[str]) -> None:
    """``tta_predicted`` and ``tta_confidence`` (mean over the symmetries of each tile, then
    over the image's tiles) after the plain columns; empty for rejected files."""
    columns = [TTA_PREFIX + probability_column(c) for c in classes]
    means = tiles.groupby("file", sort=False)[columns].mean() if len(tiles) else None
    predicted, confidence = [], []
    for file, rejected in zip(predictions["file"], predictions["rejected"], strict=True):
        if rejected or means is None or file not in means.index:
            predicted.append("")
            confidence.append(np.nan)
            continue
        prob = means.loc[file].to_numpy(dtype=float)
        predicted.append(classes[int(prob.argmax())])
        confidence.append(float(prob.max()))
    predictions[TTA_PREFIX + "predicted"] = predicted
    predictions[TTA_PREFIX + "confidence"] = confidence


def _log_summary(predictions: pd.DataFrame, n_tiles: int, seconds: float, source: str) -> None:
    done = predictions[~predictions["rejected"]]
    per_class = Counter(done["predicted"])
    logger.info(
        "Predicted %d images (%d tiles) in %.1fs with %s: %s; %d low confidence, %d mostly "
        "background, %d rejected", len(done), n_tiles, seconds, source,
        ", ".join(f"{c} {n}" for c, n in sorted(per_class.items())) or "none",
        int(done["low_confidence"].sum()), int(done["mostly_background"].sum()),
        int(predictions["rejected"].sum()),
    )
    rejected = predictions[predictions["rejected"]]
    if len(rejected):
        logger.warning("%d file(s) rejected (see the 'reason' column): %s%s", len(rejected),
                       ", ".join(rejected["file"].head(5)), " ..." if len(rejected) > 5 else "")
    for row in rejected.itertuples(index=False):
        logger.info("Rejected '%s': %s", row.file, row.reason)
