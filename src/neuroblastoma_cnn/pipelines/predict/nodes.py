"""Prediction: classify new images with a trained model, and show where it looked (Grad-CAM).

A model is only ever applied with the preprocessing it was trained with: the image checks and
tiling come from the model's own record (:class:`~neuroblastoma_cnn.preprocessing.Preprocessing`),
never from the current ``ingestion`` parameters, and new images go through the same code as the
training images (:mod:`neuroblastoma_cnn.imaging`): same decoding, tissue rule, grid and resize.
Image-level probabilities are the mean of the tile probabilities, as in evaluation
(:func:`~neuroblastoma_cnn.predictions.aggregate_image_probabilities`).

Decisions:

- Every file under the folder is considered, at any depth; hidden and system files (``.DS_Store``,
  ``Thumbs.db``) are skipped. A file that cannot be used gets a row with ``rejected`` and the
  reason (wrong extension, unreadable, corrupt, too small for one tile...), never an exception.
- Mostly background (no tile reaches the model's ``min_tissue_fraction``): the image is predicted
  from its ``background_fallback_tiles`` tiles with the most tissue, and flagged
  ``mostly_background``: a prediction, but one to look at.
- ``low_confidence``: the top image probability is below ``min_confidence``.
- Images are decoded and tiled by ``workers`` threads while the model predicts batches of
  ``batch_size`` tiles (tiles of several images share a batch; the last batch is padded so every
  call has the same shape). Threads suffice: Pillow decodes and resizes, NumPy masks and
  TensorFlow predicts with the GIL released. Decoding follows the record's ``decoding``
  (``reduced``: no more pixels than the model sees), as ingestion did.
- A model trained with stain normalisation carries its reference in the record: new tiles (and
  Grad-CAM's) are normalised with it, as the training tiles were.
- ``tta``: each tile is also predicted under the eight exact symmetries; the mean goes into
  extra columns (``tta_predicted``, ``tta_confidence``) beside the plain prediction.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from neuroblastoma_cnn.analysis.gradcam import GradCam, image_gradcam, overlay
from neuroblastoma_cnn.analysis.predictions import (
    FLAG_COLUMNS,
    aggregate_image_probabilities,
    model_probabilities,
    prediction_columns,
    probability_column,
)
from neuroblastoma_cnn.core.errors import DataError
from neuroblastoma_cnn.core.params import PredictParams
from neuroblastoma_cnn.core.preprocessing import Preprocessing, preprocessing_of
from neuroblastoma_cnn.images.decoding import (
    Decoded,
    ImageRejected,
    TilingConfig,
    decode_scaled,
    is_hidden,
)
from neuroblastoma_cnn.images.online_augmentation import N_DIHEDRAL, dihedral_numpy
from neuroblastoma_cnn.images.slides import is_slide
from neuroblastoma_cnn.images.stain import normalise_tiles
from neuroblastoma_cnn.runtime.parallel import ordered_map

from .slide_outputs import (
    HEATMAP_SUFFIX,
    LogProgress,
    SlideTiles,
    add_shares,
    draw_gallery,
    draw_heatmap,
    log_tile_progress,
    plan_slide,
)

logger = logging.getLogger(__name__)

OVERLAY_SUFFIX = ".png"
#: Prefix of the test-time-augmented columns (``predict.tta``): beside the plain ones.
TTA_PREFIX = "tta_"


def model_source(model: Any) -> str:
    """Which model this is, as the tables and logs name it."""
    return str(getattr(model, "model_source", None) or getattr(model, "name", "model"))


# ----------------------------------------------------------------------------- one image


@dataclass
class PreparedImage:
    """The tiles of one image the model will see, with where they were cut."""

    file: str
    tiles: np.ndarray  # uint8 [n, s, s, 3]
    positions: list[tuple[int, int]]
    fractions: list[float]
    mostly_background: bool
    width: int
    height: int


@dataclass(frozen=True)
class Rejection:
    file: str
    reason: str


def list_image_files(root: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """``(name, path)`` of every file under ``root`` at any depth, ``name`` relative to ``root``
    (posix); a file ``root`` is itself. Hidden and system files are skipped, not rejected."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"'{root}' does not exist: put the images to classify there "
                                "(any sub-folders).")
    if root.is_file():
        return [(root.name, root)]
    found: list[tuple[str, Path]] = []
    skipped = 0
    for folder, dirs, names in os.walk(root):
        skipped += sum(is_hidden(d) for d in dirs)
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))
        for name in sorted(names):
            if is_hidden(name):
                skipped += 1
                continue
            path = Path(folder) / name
            found.append((path.relative_to(root).as_posix(), path))
    if skipped:
        logger.debug("Skipped %d hidden or system entries under '%s'", skipped, root)
    return sorted(found)


def decode_for_prediction(path: Path, name: str, preprocessing: Preprocessing) -> Decoded:
    """Reads an image as ingestion did for the model's training images (the record's decoding
    scale); raises :class:`ImageRejected` for a file it would have rejected (extension,
    content, size)."""
    return preprocessing.image_checks.read_for(path, name, preprocessing.tiling)


def select_tiles(
    image: np.ndarray | Decoded, tiling: TilingConfig, fallback_tiles: int
) -> tuple[np.ndarray, list[tuple[int, int]], list[float], bool]:
    """The tiles training would keep; if none, the ``fallback_tiles`` with the most tissue.

    Returns ``(tiles, positions, tissue_fractions, mostly_background)``.
    """
    tiles, background = tiling.tiles_or_fallback(image, fallback_tiles)
    return (np.stack([t.tile for t in tiles]), [(t.x, t.y) for t in tiles],
            [t.tissue_fraction for t in tiles], background)


def prepare_image(
    path: Path, name: str, preprocessing: Preprocessing, fallback_tiles: int
) -> PreparedImage:
    """Decodes and tiles one file exactly as training did; raises :class:`ImageRejected`."""
    decoded = decode_for_prediction(path, name, preprocessing)
    tiles, positions, fractions, background = select_tiles(
        decoded, preprocessing.tiling, fallback_tiles
    )
    tiles = normalise_tiles(tiles, preprocessing.stain_reference)  # as in training, if at all
    return PreparedImage(name, tiles, positions, fractions, background, decoded.width,
                         decoded.height)


def _prepare_or_reject(
    name: str, path: Path, preprocessing: Preprocessing, fallback_tiles: int
) -> PreparedImage | SlideTiles | Rejection:
    try:
        if is_slide(path):  # tissue found here; its tiles are read later, chunk by chunk
            return plan_slide(path, name, preprocessing, fallback_tiles)
        return prepare_image(path, name, preprocessing, fallback_tiles)
    except ImageRejected as exc:
        return Rejection(name, exc.reason)
    except Exception as exc:  # one bad file never stops the others
        logger.debug("Unexpected error on '%s'", name, exc_info=True)
        return Rejection(name, f"unexpected error: {type(exc).__name__}: {exc}")


def _prepared_in_order(
    files: Sequence[tuple[str, Path]], preprocessing: Preprocessing, settings: PredictParams
) -> Iterator[PreparedImage | SlideTiles | Rejection]:
    """Prepares files on worker threads (decoding releases the GIL), yielding in input order
    with a bounded look-ahead so memory does not grow with the number of files."""
    job = partial(_prepare_or_reject, preprocessing=preprocessing,
                  fallback_tiles=settings.background_fallback_tiles)
    return ordered_map(lambda item: job(*item), files, settings.workers, processes=False)


# ----------------------------------------------------------------------------- many images


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
    called after each file. Slides (:mod:`neuroblastoma_cnn.slides`) are streamed to the model
    a chunk of tiles at a time, with ``tile_progress(file, n_tiles)`` called on each chunk's
    size; with a slide among the files, tiles also get ``level, tile_px, mpp`` and predictions
    ``share_<class>``.
    """
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
    prob = batcher.finish()

    tiles = pd.DataFrame(tile_meta)
    for i, column in enumerate(prob_cols):
        tiles[column] = prob[:, i] if len(tiles) else pd.Series(dtype=float)
    if settings.tta:
        tta = batcher.finish_tta()
        for i, column in enumerate(prob_cols):
            tiles[TTA_PREFIX + column] = tta[:, i] if len(tiles) else pd.Series(dtype=float)
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
    _log_summary(predictions, len(tiles), time.perf_counter() - started, source)
    return predictions, tiles


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


# ----------------------------------------------------------------------------- Grad-CAM


def overlay_name(file: str) -> str:
    """A relative ``.png`` name for a file's overlay (``a/b.jpg`` -> ``a/b.jpg.png``)."""
    parts = [p if p != ".." else "__" for p in PurePosixPath(str(file).replace("\\", "/")).parts
             if p not in ("/", ".")]
    parts = [p.replace(":", "_") for p in parts] or ["image"]
    return "/".join(parts) + OVERLAY_SUFFIX


def gradcam_overlays(
    files: Iterable[tuple[str, Path]],
    model: Any,
    predictions: pd.DataFrame,
    params: PredictParams,
    tiles: pd.DataFrame | None = None,
) -> dict[str, Callable[[], Any]]:
    """``{file: callable}`` drawing each predicted image with the Grad-CAM heatmap of its
    predicted class (a PIL image); each callable decodes its image only when called (lazy
    saving), and returns None (logged) if the image cannot be drawn. Empty when ``gradcam`` is
    off. Save each picture as :func:`overlay_name` of its file. A slide gets the gallery of
    its most confident tiles (from ``tiles``, the tile predictions) instead of a whole overlay."""
    settings = params
    if not settings.gradcam:
        logger.info("Grad-CAM overlays off (predict.gradcam: false)")
        return {}
    if getattr(model, "bundle", None) is not None:
        logger.info("Grad-CAM overlays not drawn: they would show the CNN's own classifier, not "
                    "the head that classified (%s)", model_source(model))
        return {}
    preprocessing = preprocessing_of(model)
    paths = dict(files)
    cam: Any = GradCam(model, batch_size=settings.batch_size)
    if preprocessing.stain_reference:
        cam = _StainedCam(cam, preprocessing.stain_reference)
    jobs: dict[str, Callable[[], Any]] = {}
    for row in predictions[~predictions["rejected"].astype(bool)].to_dict("records"):
        if row["file"] not in paths:
            raise DataError(f"'{row['file']}' is in the predictions but not among the files.")
        path = paths[row["file"]]
        if is_slide(path):
            if tiles is not None:
                plain = cam._cam if isinstance(cam, _StainedCam) else cam  # tiles normalised
                jobs[row["file"]] = partial(draw_gallery, path, row, _tiles_of(tiles, row),
                                            plain, preprocessing, settings)
            continue
        jobs[row["file"]] = partial(_draw_overlay, path, row, cam, preprocessing, settings)
    return jobs


def _tiles_of(tiles: pd.DataFrame, row: Mapping[str, Any]) -> pd.DataFrame:
    return tiles[tiles["file"].astype(str) == str(row["file"])]


def slide_heatmaps(
    files: Iterable[tuple[str, Path]], model: Any, predictions: pd.DataFrame,
    tiles: pd.DataFrame, params: PredictParams,
) -> dict[str, Callable[[], Any]]:
    """``{file: callable}`` drawing each predicted slide's class heatmaps (a PIL image, or
    None if it cannot be drawn); crops get none. Save as :func:`heatmap_name` of the file."""
    classes = list(preprocessing_of(model).classes)
    paths = dict(files)
    jobs: dict[str, Callable[[], Any]] = {}
    for row in predictions[~predictions["rejected"].astype(bool)].to_dict("records"):
        path = paths.get(row["file"])
        if path is not None and is_slide(path):
            jobs[row["file"]] = partial(draw_heatmap, path, row, _tiles_of(tiles, row),
                                        classes, params)
    return jobs


def heatmap_name(file: str) -> str:
    """``a/b.svs`` -> ``a/b.svs.heatmap.png``."""
    return overlay_name(file)[: -len(OVERLAY_SUFFIX)] + HEATMAP_SUFFIX + OVERLAY_SUFFIX


class _StainedCam:
    """A Grad-CAM whose tiles pass through the model's stain reference first, as in training."""

    def __init__(self, cam: GradCam, reference: Mapping[str, Any]):
        self._cam, self._reference = cam, reference

    def tile_maps(self, tiles: np.ndarray, class_index: int) -> Any:
        return self._cam.tile_maps(normalise_tiles(tiles, self._reference), class_index)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cam, name)


def _draw_overlay(
    path: Path, row: Mapping[str, Any], cam: Any, preprocessing: Preprocessing,
    settings: PredictParams,
) -> Any:
    name = str(row["file"])
    try:
        checks = preprocessing.image_checks
        data = checks.read_bytes(path, name)
        decoded = checks.decode_for(data, name, preprocessing.tiling)  # the predicted tiles
        side = settings.gradcam_max_side
        scale = min(1.0, side / max(decoded.height, decoded.width)) if side else 1.0
        class_index = preprocessing.classes.index(str(row["predicted"]))
        heat, covered = image_gradcam(cam, decoded, preprocessing.tiling, class_index,
                                      settings.background_fallback_tiles, scale)
        rgb = _display_pixels(data, name, decoded, heat.shape, checks.max_image_pixels)
        picture = overlay(rgb, heat, covered, alpha=settings.gradcam_alpha)
        return _with_caption(picture, _caption(row))
    except Exception as exc:
        logger.warning("No Grad-CAM overlay for '%s': %s", name, exc)
        return None


def _display_pixels(
    data: bytes, name: str, decoded: Decoded, shape: tuple[int, ...], max_image_pixels: int
) -> np.ndarray:
    """The picture under a heatmap of ``shape``: the tiling's decode if it has pixels enough,
    else the file decoded again at the largest power-of-two reduction that has them."""
    height, width = int(shape[0]), int(shape[1])
    rgb = decoded.rgb
    if rgb.shape[0] < height or rgb.shape[1] < width:
        factor = decoded.scale
        while factor > 1 and (decoded.width // factor < width
                              or decoded.height // factor < height):
            factor //= 2
        rgb = decode_scaled(data, name, max_image_pixels, lambda w, h: factor).rgb
    if rgb.shape[:2] != (height, width):
        rgb = np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR))
    return rgb


def _caption(row: Mapping[str, Any]) -> str:
    predicted = str(row["predicted"])
    text = f"{row['file']}: {predicted} ({float(row[probability_column(predicted)]):.2f})"
    flags = [flag.replace("_", " ") for flag in ("low_confidence", "mostly_background")
             if bool(row.get(flag))]
    return text + (f"  [{', '.join(flags)}]" if flags else "")


def _with_caption(picture: np.ndarray, text: str) -> Any:
    """The overlay under a white strip naming the file, the class and its probability."""
    width = picture.shape[1]
    size = int(np.clip(width / 60, 10, 28))
    try:
        font: Any = ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType
        font = ImageFont.load_default()
    strip = size + 10
    canvas = Image.new("RGB", (width, picture.shape[0] + strip), "white")
    canvas.paste(Image.fromarray(picture), (0, strip))
    ImageDraw.Draw(canvas).text((4, 4), text, fill="black", font=font)
    return canvas


# ----------------------------------------------------------------------------- Kedro nodes


def select_prediction_model(models: Any, params: PredictParams) -> Any:
    """Loads the model the parameters name (``model``, ``version``); its record is checked as it
    is loaded, before any image is read."""
    model = models.load(params.model, params.version)
    if params.head is not None:  # extractor + scikit-learn head, refused unless fitted on it
        from neuroblastoma_cnn.models.feature_heads import (  # noqa: PLC0415  (lazy: Keras)
            head_classifier,
        )

        model = head_classifier(models.models_dir, model, params.head)
    preprocessing = preprocessing_of(model)
    tiling = preprocessing.tiling
    logger.info(
        "Model %s: classes %s; tiles %s px every %s px, min tissue %.2f, resized to %d px",
        model_source(model), ", ".join(preprocessing.classes), tiling.tile_size or "whole-image",
        tiling.effective_stride or "-", tiling.min_tissue_fraction, tiling.input_size,
    )
    return model


def predict_images(
    images_dir: Path, model: Any, params: PredictParams
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every file under the prediction folder, classified (see :func:`predict_files`)."""
    files = list_image_files(images_dir)
    if not files:
        raise DataError(f"No files to classify in '{images_dir}'.",
                        hint="put images there, in any sub-folders")
    progress = LogProgress("Prepared %d/%d images (%.1f images/s)", len(files))
    return predict_files(files, model, params, progress=progress)


def draw_gradcam_overlays(
    images_dir: Path, model: Any, predictions: pd.DataFrame, tiles: pd.DataFrame,
    params: PredictParams,
) -> dict[str, Callable[[], Any]]:
    """Grad-CAM overlays of the prediction folder's images (a slide's: its gallery of most
    confident tiles), named ``<file>.png`` there."""
    jobs = gradcam_overlays(list_image_files(images_dir), model, predictions, params, tiles)
    return {overlay_name(file): draw for file, draw in jobs.items()}


def draw_slide_heatmaps(
    images_dir: Path, model: Any, predictions: pd.DataFrame, tiles: pd.DataFrame,
    params: PredictParams,
) -> dict[str, Callable[[], Any]]:
    """Class heatmaps of the prediction folder's slides, named ``<file>.heatmap.png``."""
    jobs = slide_heatmaps(list_image_files(images_dir), model, predictions, tiles, params)
    return {heatmap_name(file): draw for file, draw in jobs.items()}
