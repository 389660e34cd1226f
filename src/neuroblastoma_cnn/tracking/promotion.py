"""Model promotion: a saved model is used (latest for `predict`, logged to MLflow) only once its
run has trained at least one epoch and evaluated it.

Why save-then-promote rather than save at the end: evaluation reads the model the catalog
saved (the same bytes `predict` will later use), so the file must exist before evaluation; a
``promotion.json`` beside it says whether it may be used:

- ``pending``  written before the model file: a run that dies at any point leaves a model
  nobody picks;
- ``promoted`` written by ``hooks.ModelPromotionHook`` after the model's evaluation nodes all
  finished, with the MLflow model URI;
- ``failed``   the run failed after saving it; ``reason`` says why.

A version folder without ``promotion.json`` (a model saved before promotion existed, or copied
in by hand) counts as promoted.

The same module says when training "did not learn": a validation loss that never moved, or one
class predicted for every validation (or test) image.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from neuroblastoma_cnn.core.storage import FsPath, as_path

logger = logging.getLogger(__name__)

STATUS_FILE = "promotion.json"
PENDING, PROMOTED, FAILED = "pending", "promoted", "failed"


def read_status(version_folder: Path | FsPath) -> dict[str, Any] | None:
    """The promotion record of a model version folder, None when it has none."""
    try:
        return json.loads((as_path(version_folder) / STATUS_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"status": FAILED, "reason": f"unreadable {STATUS_FILE}"}


def is_usable(version_folder: Path) -> bool:
    """Whether `predict` may pick this version: promoted, or saved before promotion existed."""
    status = read_status(version_folder)
    return status is None or status.get("status") == PROMOTED


def write_status(version_folder: Path | FsPath, status: str, **fields: Any) -> None:
    """Writes the promotion record (atomically: a reader never sees half a file; on an object
    store one upload is atomic, so it is written in place)."""
    folder = as_path(version_folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"status": status, "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              **{k: v for k, v in fields.items() if v is not None}}
    text = json.dumps(record, indent=2, sort_keys=True, default=str)
    if isinstance(folder, FsPath):
        (folder / STATUS_FILE).write_text(text)
        return
    tmp = folder / f".{STATUS_FILE}.tmp"
    tmp.write_text(text)
    tmp.replace(folder / STATUS_FILE)


# ------------------------------------------------------------------ did training learn?

def _column(history: Any, name: str) -> list[Any]:
    if history is None or not hasattr(history, "columns") or name not in history.columns:
        return []
    return [v for v in history[name].tolist()
            if not (isinstance(v, float) and math.isnan(v)) and v is not None]


def _n_classes(value: Any) -> int | None:
    """How many classes an epoch predicted: a count, or a list / separated string of names."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (list, tuple, set)):
        return len(set(value))
    text = str(value).strip()
    if text.startswith("["):
        try:
            return len(set(json.loads(text)))
        except ValueError:
            pass
    for sep in (";", "|", ","):
        if sep in text:
            return len({t.strip() for t in text.split(sep) if t.strip()})
    return 1 if text else None


def untrained_reasons(history: Any, atol: float = 1e-6) -> list[str]:
    """Why a training history shows a model that did not learn ([] when it did).

    - the validation loss is the same at every epoch (at least two epochs);
    - the last epoch predicted a single class for every validation image (history column
      ``val_predicted_classes``, when training records it).
    """
    reasons = []
    losses = [float(v) for v in _column(history, "val_loss")]
    if len(losses) >= 2 and max(losses) - min(losses) <= atol * max(1.0, abs(losses[0])):
        reasons.append(f"validation loss constant at {losses[0]:.4f} over {len(losses)} epochs")
    predicted = _column(history, "val_predicted_classes")
    if predicted and _n_classes(predicted[-1]) == 1:
        reasons.append("one class predicted for every validation image at the last epoch "
                       f"({predicted[-1]})")
    return reasons


def single_class_reason(image_predictions: Any, column: str = "predicted") -> str | None:
    """'one class predicted for every test image' when that happened (two images or more)."""
    values = _column(image_predictions, column)
    if len(values) >= 2 and len(set(map(str, values))) == 1:
        return f"one class ({values[0]}) predicted for every test image ({len(values)} images)"
    return None


def epochs_trained(history: Any) -> int:
    """Rows of a training history (one per finished epoch)."""
    return 0 if history is None else len(history)
