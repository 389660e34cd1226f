"""Prediction: classify new images with a trained model, and show where it looked (Grad-CAM).

A model is only ever applied with the preprocessing it was trained with: the tiling settings
come from the model's own record (the ingestion parameters stored with it), never from the
current ``ingestion`` parameters, and new images go through the ingestion code itself
(:func:`decode_image`, :meth:`TilingConfig.tile`): same decoding, tissue rule, grid and resize.
Image-level probabilities are the mean of the tile probabilities, computed by the evaluation's
:func:`aggregate_image_probabilities`.

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
  call has the same shape).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from neuroblastoma_cnn.datasets.keras_model import model_record
from neuroblastoma_cnn.pipelines.evaluation.metrics import (
    PROB_PREFIX,
    aggregate_image_probabilities,
)
from neuroblastoma_cnn.pipelines.ingestion.nodes import (
    ImageRejected,
    IngestionSettings,
    Reason,
    TilingConfig,
    decode_image,
    is_hidden,
    resize_tile,
)

logger = logging.getLogger(__name__)

#: Defaults of the ``predict`` parameters (conf/base/parameters_predict.yml says the same; a
#: test keeps them equal) so that the command line predicts exactly like ``kedro run``.
PREDICT_DEFAULTS: dict[str, Any] = {
    "model": "resnet34",
    "version": None,
    "batch_size": 32,
    "workers": 2,
    "min_confidence": 0.6,
    "background_fallback_tiles": 3,
    "gradcam": True,
    "gradcam_max_side": 2048,
    "gradcam_alpha": 0.5,
}
FLAG_COLUMNS = ["low_confidence", "mostly_background", "rejected"]
OVERLAY_SUFFIX = ".png"


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class PredictSettings:
    """Validated ``predict`` parameters (what to do with the model, not how images are tiled)."""

    batch_size: int = PREDICT_DEFAULTS["batch_size"]
    workers: int = PREDICT_DEFAULTS["workers"]
    min_confidence: float = PREDICT_DEFAULTS["min_confidence"]
    background_fallback_tiles: int = PREDICT_DEFAULTS["background_fallback_tiles"]
    gradcam: bool = PREDICT_DEFAULTS["gradcam"]
    gradcam_max_side: int | None = PREDICT_DEFAULTS["gradcam_max_side"]
    gradcam_alpha: float = PREDICT_DEFAULTS["gradcam_alpha"]

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> PredictSettings:
        params = dict(params or {})
        unknown = sorted(set(params) - set(PREDICT_DEFAULTS))
        if unknown:
            raise ValueError(
                f"Unknown predict parameter(s) {unknown}; known: {', '.join(PREDICT_DEFAULTS)}."
            )
        values = {key: params.get(key, PREDICT_DEFAULTS[key]) for key in cls.__dataclass_fields__}
        for key in ("batch_size", "workers", "background_fallback_tiles"):
            if not _positive_int(values[key]):
                raise ValueError(f"predict.{key} must be a positive integer, got {values[key]!r}")
        side = values["gradcam_max_side"]
        if side is not None and not _positive_int(side):
            raise ValueError(f"predict.gradcam_max_side must be a positive integer or null, "
                             f"got {side!r}")
        for key in ("min_confidence", "gradcam_alpha"):
            if not 0.0 <= float(values[key]) <= 1.0:
                raise ValueError(f"predict.{key} must be within [0, 1], got {values[key]!r}")
        if not isinstance(values["gradcam"], bool):
            raise ValueError(f"predict.gradcam must be true or false, got {values['gradcam']!r}")
        return cls(**values)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class Preprocessing:
    """How a model's training images were prepared, rebuilt from the model's own record."""

    classes: tuple[str, ...]
    ingestion: IngestionSettings
    source: str

    @property
    def tiling(self) -> TilingConfig:
        return self.ingestion.tiling

    @classmethod
    def from_model(cls, model: Any) -> Preprocessing:
        """Reads and checks the record; refuses a model whose record is missing or does not fit
        the model (which would mean tiles prepared differently from its training tiles)."""
        source = str(getattr(model, "model_source", None) or getattr(model, "name", "model"))
        record = model_record(model)
        classes = record.get("classes")
        params = record.get("ingestion")
        if not classes or not isinstance(params, Mapping):
            raise ValueError(
                f"Model '{source}' has no preprocessing record (classes and ingestion "
                "parameters): it cannot be applied with the settings it was trained with."
            )
        settings = IngestionSettings.from_params(params)
        tiling = settings.tiling
        summary = {"input_size": tiling.input_size, "tile_size": tiling.tile_size,
                   "stride": tiling.effective_stride,
                   "min_tissue_fraction": tiling.min_tissue_fraction}
        for key, expected in summary.items():
            if key in record and record[key] != expected:
                raise ValueError(
                    f"Model '{source}': its record says {key} = {record[key]!r} but its "
                    f"ingestion parameters give {expected!r}; the record is inconsistent."
                )
        input_shape = tuple(model.input_shape)
        if input_shape[1:] != (tiling.input_size, tiling.input_size, 3):
            raise ValueError(
                f"Model '{source}' takes inputs {input_shape[1:]} but its record says "
                f"{tiling.input_size}x{tiling.input_size} RGB tiles."
            )
        n_outputs = int(model.output_shape[-1])
        if n_outputs != len(classes):
            raise ValueError(f"Model '{source}' has {n_outputs} outputs but its record lists "
                             f"{len(classes)} classes {list(classes)}.")
        return cls(tuple(str(c) for c in classes), settings, source)


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


def decode_for_prediction(path: Path, name: str, settings: IngestionSettings) -> np.ndarray:
    """Reads an image as ingestion does; raises :class:`ImageRejected` for a file it would
    reject (extension, content, size: an image must hold one tile)."""
    suffix = Path(name).suffix.lower()
    if suffix not in settings.extensions:
        expected = ", ".join(sorted(settings.extensions))
        raise ImageRejected(name, f"{Reason.NOT_IMAGE_EXTENSION}: '{suffix or '(none)'}' "
                                  f"(expected {expected})")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageRejected(name, f"{Reason.NOT_AN_IMAGE}: cannot read file ({exc})") from exc
    rgb, _ = decode_image(data, name, settings.max_image_pixels)
    height, width = rgb.shape[:2]
    tile_size = settings.tiling.tile_size
    smallest = max(settings.min_image_size, tile_size or 0)
    if width < smallest or height < smallest:
        what = (f" for one tile: image is {width}x{height}, the model's tiles are "
                f"{tile_size}x{tile_size} at native resolution"
                if smallest == tile_size
                else f": image is {width}x{height}, min_image_size is {settings.min_image_size}")
        raise ImageRejected(name, f"{Reason.TOO_SMALL}{what}")
    return rgb


def select_tiles(
    rgb: np.ndarray, tiling: TilingConfig, fallback_tiles: int
) -> tuple[np.ndarray, list[tuple[int, int]], list[float], bool]:
    """The tiles training would keep; if none, the ``fallback_tiles`` with the most tissue.

    Returns ``(tiles, positions, tissue_fractions, mostly_background)``.
    """
    kept = tiling.tile(rgb)
    if kept:
        return (np.stack([t.tile for t in kept]), [(t.x, t.y) for t in kept],
                [t.tissue_fraction for t in kept], False)
    height, width = rgb.shape[:2]
    size_x, size_y = (width, height) if tiling.tile_size is None else (tiling.tile_size,) * 2
    best = sorted(tiling.score(rgb), key=lambda s: (-s[2], s[1], s[0]))[:fallback_tiles]
    best.sort(key=lambda s: (s[1], s[0]))
    tiles = np.stack([resize_tile(rgb[y : y + size_y, x : x + size_x], tiling.input_size)
                      for x, y, _ in best])
    return tiles, [(x, y) for x, y, _ in best], [f for _, _, f in best], True


def prepare_image(
    path: Path, name: str, preprocessing: Preprocessing, fallback_tiles: int
) -> PreparedImage:
    """Decodes and tiles one file exactly as training did; raises :class:`ImageRejected`."""
    rgb = decode_for_prediction(path, name, preprocessing.ingestion)
    tiles, positions, fractions, background = select_tiles(
        rgb, preprocessing.tiling, fallback_tiles
    )
    height, width = rgb.shape[:2]
    return PreparedImage(name, tiles, positions, fractions, background, width, height)


def _prepare_or_reject(
    name: str, path: Path, preprocessing: Preprocessing, fallback_tiles: int
) -> PreparedImage | Rejection:
    try:
        return prepare_image(path, name, preprocessing, fallback_tiles)
    except ImageRejected as exc:
        return Rejection(name, exc.reason)
    except Exception as exc:  # one bad file never stops the others
        logger.debug("Unexpected error on '%s'", name, exc_info=True)
        return Rejection(name, f"unexpected error: {type(exc).__name__}: {exc}")


def _prepared_in_order(
    files: Sequence[tuple[str, Path]], preprocessing: Preprocessing, settings: PredictSettings
) -> Iterator[PreparedImage | Rejection]:
    """Prepares files on worker threads (decoding releases the GIL), yielding in input order
    with a bounded look-ahead so memory does not grow with the number of files."""
    job = partial(_prepare_or_reject, preprocessing=preprocessing,
                  fallback_tiles=settings.background_fallback_tiles)
    if settings.workers == 1:
        for name, path in files:
            yield job(name, path)
        return
    remaining = iter(files)
    with ThreadPoolExecutor(settings.workers, thread_name_prefix="prepare") as pool:
        pending: deque[Future[PreparedImage | Rejection]] = deque(
            pool.submit(job, name, path) for name, path in _take(remaining, 2 * settings.workers)
        )
        while pending:
            done = pending.popleft().result()
            for name, path in _take(remaining, 1):
                pending.append(pool.submit(job, name, path))
            yield done


def _take(iterator: Iterator[tuple[str, Path]], n: int) -> list[tuple[str, Path]]:
    out = []
    for item in iterator:
        out.append(item)
        if len(out) == n:
            break
    return out


# ----------------------------------------------------------------------------- many images


@dataclass
class _Batcher:
    """Feeds tiles to the model in fixed-size batches, in arrival order."""

    model: Any
    batch_size: int
    pending: list[np.ndarray] = field(default_factory=list)
    n_pending: int = 0
    results: list[np.ndarray] = field(default_factory=list)

    def add(self, tiles: np.ndarray) -> None:
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
        return np.concatenate(self.results)

    def _run(self, batch: np.ndarray, keep: int | None = None) -> None:
        prob = np.asarray(self.model.predict_on_batch(batch.astype(np.float32)), np.float64)
        self.results.append(prob if keep is None else prob[:keep])


def prediction_columns(classes: Sequence[str]) -> list[str]:
    return ["file", "predicted", *(f"{PROB_PREFIX}{c}" for c in classes), "n_tiles",
            *FLAG_COLUMNS, "reason", "width", "height", "model"]


def predict_files(
    files: Sequence[tuple[str, Path]],
    model: Any,
    params: Mapping[str, Any] | None = None,
    progress: Callable[[int], Any] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Classifies image files; returns ``(predictions, tile_predictions)``.

    ``files`` are ``(name, path)`` pairs; ``name`` is what the tables show. ``predictions`` has
    one row per file, in order: ``file, predicted, prob_<class>..., n_tiles, low_confidence,
    mostly_background, rejected, reason, width, height, model``. ``tile_predictions`` has one
    row per tile used: ``file, x, y, tissue_fraction, prob_<class>...``. ``progress(1)`` is
    called after each file.
    """
    preprocessing = Preprocessing.from_model(model)
    settings = PredictSettings.from_params(params)
    classes = list(preprocessing.classes)
    prob_cols = [f"{PROB_PREFIX}{c}" for c in classes]
    batcher = _Batcher(model, settings.batch_size)
    outcomes: list[PreparedImage | Rejection] = []
    tile_meta: dict[str, list[Any]] = {"file": [], "x": [], "y": [], "tissue_fraction": []}
    started = time.perf_counter()
    for outcome in _prepared_in_order(files, preprocessing, settings):
        if isinstance(outcome, PreparedImage):
            batcher.add(outcome.tiles)
            tile_meta["file"].extend([outcome.file] * len(outcome.positions))
            tile_meta["x"].extend(x for x, _ in outcome.positions)
            tile_meta["y"].extend(y for _, y in outcome.positions)
            tile_meta["tissue_fraction"].extend(round(f, 4) for f in outcome.fractions)
            outcome.tiles = outcome.tiles[:0]  # pixels no longer needed
        outcomes.append(outcome)
        if progress is not None:
            progress(1)
    prob = batcher.finish()

    tiles = pd.DataFrame(tile_meta)
    for i, column in enumerate(prob_cols):
        tiles[column] = prob[:, i] if len(tiles) else pd.Series(dtype=float)
    images = (
        aggregate_image_probabilities(tiles.assign(image_path=tiles["file"], label="", group=""))
        .set_index("image_path")
        if len(tiles) else pd.DataFrame()
    )
    rows = [_prediction_row(o, images, classes, settings, preprocessing.source)
            for o in outcomes]
    predictions = pd.DataFrame(rows, columns=prediction_columns(classes))
    for column in FLAG_COLUMNS:
        predictions[column] = predictions[column].astype(bool)
    for column in ("n_tiles", "width", "height"):  # integers, empty for rejected files
        predictions[column] = predictions[column].astype("Int64")
    _log_summary(predictions, len(tiles), time.perf_counter() - started, preprocessing.source)
    return predictions, tiles


def _prediction_row(
    outcome: PreparedImage | Rejection,
    images: pd.DataFrame,
    classes: list[str],
    settings: PredictSettings,
    source: str,
) -> dict[str, Any]:
    if isinstance(outcome, Rejection):
        return {"file": outcome.file, "predicted": "", "n_tiles": 0, "low_confidence": False,
                "mostly_background": False, "rejected": True, "reason": outcome.reason,
                "width": None, "height": None, "model": source,
                **{f"{PROB_PREFIX}{c}": math.nan for c in classes}}
    image = images.loc[outcome.file]
    prob = np.array([float(image[f"{PROB_PREFIX}{c}"]) for c in classes])
    best = int(prob.argmax())
    return {
        "file": outcome.file, "predicted": classes[best],
        **{f"{PROB_PREFIX}{c}": p for c, p in zip(classes, prob, strict=True)},
        "n_tiles": int(image["n_tiles"]),
        "low_confidence": bool(prob[best] < settings.min_confidence),
        "mostly_background": outcome.mostly_background, "rejected": False, "reason": "",
        "width": outcome.width, "height": outcome.height, "model": source,
    }


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


def image_gradcam(
    cam: Any,
    rgb: np.ndarray,
    tiling: TilingConfig,
    class_index: int,
    fallback_tiles: int = PREDICT_DEFAULTS["background_fallback_tiles"],
    scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM heatmap of a class over a whole image: ``(heat in [0, 1], covered)`` of shape
    ``(round(H * scale), round(W * scale))``, built from the same tiles the prediction used."""
    from neuroblastoma_cnn.gradcam import stitch

    tiles, positions, _, _ = select_tiles(rgb, tiling, fallback_tiles)
    height, width = rgb.shape[:2]
    tile_w, tile_h = (width, height) if tiling.tile_size is None else (tiling.tile_size,) * 2
    shape = (max(1, round(height * scale)), max(1, round(width * scale)))
    return stitch(
        cam.tile_maps(tiles, class_index),
        [(round(x * scale), round(y * scale)) for x, y in positions],
        (max(1, round(tile_w * scale)), max(1, round(tile_h * scale))),
        shape,
    )


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
    params: Mapping[str, Any] | None = None,
) -> dict[str, Callable[[], Any]]:
    """``{file: callable}`` drawing each predicted image with the Grad-CAM heatmap of its
    predicted class (a PIL image); each callable decodes its image only when called (lazy
    saving), and returns None (logged) if the image cannot be drawn. Empty when ``gradcam`` is
    off. Save each picture as :func:`overlay_name` of its file."""
    settings = PredictSettings.from_params(params)
    if not settings.gradcam:
        logger.info("Grad-CAM overlays off (predict.gradcam: false)")
        return {}
    from neuroblastoma_cnn.gradcam import GradCam

    preprocessing = Preprocessing.from_model(model)
    paths = dict(files)
    cam = GradCam(model, batch_size=settings.batch_size)
    jobs: dict[str, Callable[[], Any]] = {}
    for row in predictions[~predictions["rejected"].astype(bool)].to_dict("records"):
        if row["file"] not in paths:
            raise ValueError(f"'{row['file']}' is in the predictions but not among the files.")
        jobs[row["file"]] = partial(
            _draw_overlay, paths[row["file"]], row, cam, preprocessing, settings
        )
    return jobs


def _draw_overlay(
    path: Path, row: Mapping[str, Any], cam: Any, preprocessing: Preprocessing,
    settings: PredictSettings,
) -> Any:
    from PIL import Image

    from neuroblastoma_cnn.gradcam import overlay

    name = str(row["file"])
    try:
        rgb = decode_for_prediction(path, name, preprocessing.ingestion)
        height, width = rgb.shape[:2]
        side = settings.gradcam_max_side
        scale = min(1.0, side / max(height, width)) if side else 1.0
        class_index = preprocessing.classes.index(str(row["predicted"]))
        heat, covered = image_gradcam(cam, rgb, preprocessing.tiling, class_index,
                                      settings.background_fallback_tiles, scale)
        if heat.shape != rgb.shape[:2]:
            rgb = np.asarray(Image.fromarray(rgb).resize(heat.shape[::-1],
                                                         Image.Resampling.BILINEAR))
        picture = overlay(rgb, heat, covered, alpha=settings.gradcam_alpha)
        return _with_caption(picture, _caption(row))
    except Exception as exc:
        logger.warning("No Grad-CAM overlay for '%s': %s", name, exc)
        return None


def _caption(row: Mapping[str, Any]) -> str:
    predicted = str(row["predicted"])
    text = f"{row['file']}: {predicted} ({float(row[PROB_PREFIX + predicted]):.2f})"
    flags = [flag.replace("_", " ") for flag in ("low_confidence", "mostly_background")
             if bool(row.get(flag))]
    return text + (f"  [{', '.join(flags)}]" if flags else "")


def _with_caption(picture: np.ndarray, text: str) -> Any:
    """The overlay under a white strip naming the file, the class and its probability."""
    from PIL import Image, ImageDraw, ImageFont

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


def select_prediction_model(models: Any, params: Mapping[str, Any]) -> Any:
    """Loads the model the parameters name (``model``, ``version``) and checks its record now,
    before any image is read."""
    settings_params = dict(params or {})
    PredictSettings.from_params(settings_params)
    model = models.load(settings_params.get("model", PREDICT_DEFAULTS["model"]),
                        settings_params.get("version"))
    preprocessing = Preprocessing.from_model(model)
    tiling = preprocessing.tiling
    logger.info(
        "Model %s: classes %s; tiles %s px every %s px, min tissue %.2f, resized to %d px",
        preprocessing.source, ", ".join(preprocessing.classes), tiling.tile_size or "whole-image",
        tiling.effective_stride or "-", tiling.min_tissue_fraction, tiling.input_size,
    )
    return model


def predict_images(
    images_dir: Path, model: Any, params: Mapping[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every file under the prediction folder, classified (see :func:`predict_files`)."""
    files = list_image_files(images_dir)
    if not files:
        raise ValueError(f"No files to classify in '{images_dir}'.")
    return predict_files(files, model, params, progress=_LogProgress(len(files)))


def draw_gradcam_overlays(
    images_dir: Path, model: Any, predictions: pd.DataFrame, params: Mapping[str, Any]
) -> dict[str, Callable[[], Any]]:
    """Grad-CAM overlays of the prediction folder's images, named ``<file>.png`` there."""
    jobs = gradcam_overlays(list_image_files(images_dir), model, predictions, params)
    return {overlay_name(file): draw for file, draw in jobs.items()}


class _LogProgress:
    """Logs progress every 10 seconds in pipeline runs (the command line shows a bar)."""

    def __init__(self, total: int, every_s: float = 10.0):
        self.total, self.done, self.every_s = total, 0, every_s
        self.started = self.last = time.perf_counter()

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            logger.info("Prepared %d/%d images (%.1f images/s)", self.done, self.total,
                        self.done / (now - self.started))
