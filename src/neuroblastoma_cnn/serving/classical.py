"""Whole-image models (classical models, the stacked hybrid: ``families.WHOLE_IMAGE_KINDS``)
through the one prediction entry point: image files to the same per-file table a CNN's answer
has (``prediction_columns``, plus the prediction sets).

Why: the model a selection chooses may be a colour/texture model; a user's ``predict``, the
command line and the served pyfunc must take it like any other. It applies the record's image
checks (extensions, sizes) as a CNN's would, then reads the whole image at its chosen scale:
no tiles (``n_tiles`` 0), no slides (a whole-slide image is rejected with its reason).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neuroblastoma_cnn.analysis.conformal import add_prediction_sets
from neuroblastoma_cnn.analysis.predictions import prediction_columns, probability_column
from neuroblastoma_cnn.images.decoding import ImageRejected
from neuroblastoma_cnn.images.slides import is_slide
from neuroblastoma_cnn.params import PredictParams

logger = logging.getLogger(__name__)


def _row(name: str, path: Path, model: Any, classes: list[str],
         settings: PredictParams) -> dict[str, Any]:
    rejected = {"file": name, "predicted": "", "n_tiles": 0, "low_confidence": False,
                "mostly_background": False, "rejected": True, "width": None, "height": None,
                "model": model.model_source, **{probability_column(c): np.nan for c in classes}}
    try:
        if is_slide(path):
            raise ImageRejected(path, "whole-slide images need a tiled (CNN) model; this "
                                f"{model.kind} model reads whole images")
        decoded = model.preprocessing.image_checks.read_for(path, name,
                                                            model.preprocessing.tiling)
        prob = model.predict_file(path)
    except ImageRejected as exc:
        return {**rejected, "reason": exc.reason}
    except Exception as exc:  # one bad file never stops the others
        logger.debug("Unexpected error on '%s'", name, exc_info=True)
        return {**rejected, "reason": f"unexpected error: {type(exc).__name__}: {exc}"}
    best = int(prob.argmax())
    return {"file": name, "predicted": classes[best],
            **{probability_column(c): float(p) for c, p in zip(classes, prob, strict=True)},
            "n_tiles": 0, "low_confidence": bool(prob[best] < settings.min_confidence),
            "mostly_background": False, "rejected": False, "reason": "",
            "width": decoded.width, "height": decoded.height, "model": model.model_source}


def predict_classical_files(files: Sequence[tuple[str, Path]], model: Any,
                            params: PredictParams, progress: Callable[[int], Any] | None = None
                            ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(predictions, tile_predictions)`` as ``tiles.predict_files`` returns them (no tiles)."""
    classes = [str(c) for c in model.preprocessing.classes]
    rows = []
    for name, path in files:
        rows.append(_row(name, Path(path), model, classes, params))
        if progress is not None:
            progress(1)
    predictions = pd.DataFrame(rows, columns=prediction_columns(classes))
    for column in ("low_confidence", "mostly_background", "rejected"):
        predictions[column] = predictions[column].astype(bool)
    for column in ("n_tiles", "width", "height"):
        predictions[column] = predictions[column].astype("Int64")
    predictions = add_prediction_sets(predictions, model.preprocessing.conformal, classes)
    tiles = pd.DataFrame(columns=["file", "x", "y", "tissue_fraction",
                                  *(probability_column(c) for c in classes)])
    logger.info("Classified %d file(s) with %s (whole images, no tiles)", len(files),
                model.model_source)
    return predictions, tiles
