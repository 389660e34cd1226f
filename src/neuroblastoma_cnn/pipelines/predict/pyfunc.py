"""An MLflow pyfunc model that classifies raw image files: what ``mlflow models serve`` runs.

Why: the Keras flavour logged by training takes 224x224 float tiles, so a client would have to
decode, tile, normalise and average exactly as the project does. This wrapper takes the image
files themselves (base64 in a DataFrame column ``image``, optional ``file`` names) and returns,
per row, the image-level probabilities, the predicted class, the number of tiles and an
``error`` (empty when the image was used), through the same :func:`nodes.predict_files` as
``kedro run --pipeline=predict``: the model's own preprocessing record (tiling, stain reference,
temperature) decides everything, and a bad file is an error row, never a failed request.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from neuroblastoma_cnn.analysis.predictions import probability_column
from neuroblastoma_cnn.core.params import PredictParams

from . import nodes

logger = logging.getLogger(__name__)

try:  # MLflow is a dependency; the base class only matters where a model is logged or served
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    PythonModel = object  # type: ignore[misc,assignment]

MODEL_ARTIFACT = "model"
PARAMS_ARTIFACT = "predict_params"


def _decode(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value)
        try:  # base64 given as bytes, or the raw file itself
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return value
    return base64.b64decode(str(value), validate=True)


_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "BMP": ".bmp"}


def _checked_name(name: str, data: bytes) -> str:
    """The name the image checks see: as given, or with the extension its content says when
    the name has none (a service's rows often carry no file name)."""
    if Path(name).suffix:
        return name
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    try:
        with Image.open(io.BytesIO(data)) as image:
            return name + _FORMATS.get(str(image.format), "")
    except (UnidentifiedImageError, OSError):
        return name


def classify_encoded(frame: pd.DataFrame, model: Any, params: PredictParams) -> pd.DataFrame:
    """Rows of base64 image files (column ``image``; ``file``: names, default ``image_<i>``)
    -> ``file, predicted, prob_<class>..., n_tiles, error``, one row per input row, in order."""
    if "image" not in frame.columns:
        raise ValueError(f"Input needs a column 'image' (base64 file bytes); it has "
                         f"{list(frame.columns)}.")
    names = (frame["file"].astype(str).tolist() if "file" in frame.columns
             else [f"image_{i}" for i in range(len(frame))])
    classes = [str(c) for c in nodes.preprocessing_of(model).classes]
    errors: dict[str, str] = {}
    checked: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="nbcnn-serve-") as tmp:
        files = []
        for i, (name, value) in enumerate(zip(names, frame["image"], strict=True)):
            try:
                data = _decode(value)
            except (binascii.Error, ValueError, TypeError) as exc:
                errors[name] = f"not base64: {exc}"
                continue
            checked[name] = _checked_name(name, data)
            path = Path(tmp) / f"{i:06d}{Path(checked[name]).suffix}"
            path.write_bytes(data)
            files.append((checked[name], path))
        predictions, _ = nodes.predict_files(files, model, params) if files else (
            pd.DataFrame(columns=nodes.prediction_columns(classes)), None)
    rows = predictions.set_index("file") if len(predictions) else predictions
    out = []
    for name in names:
        row = {"file": name, "predicted": "", "n_tiles": 0, "error": errors.get(name, "")}
        if name not in errors and checked.get(name) in rows.index:
            found = rows.loc[checked[name]]
            row["error"] = str(found["reason"]) if bool(found["rejected"]) else ""
            row["predicted"] = str(found["predicted"])
            row["n_tiles"] = int(found["n_tiles"] or 0)
            row.update({probability_column(c): float(found[probability_column(c)])
                        for c in classes})
        out.append(row)
    columns = ["file", "predicted", *(probability_column(c) for c in classes), "n_tiles", "error"]
    return pd.DataFrame(out).reindex(columns=columns)


class RawImageModel(PythonModel):
    """The pyfunc model: a ``.keras`` file with its record, and the prediction settings."""

    def load_context(self, context: Any) -> None:
        from neuroblastoma_cnn.datasets.keras_model import load_keras_model  # noqa: PLC0415

        self.model = load_keras_model(context.artifacts[MODEL_ARTIFACT])
        raw = json.loads(Path(context.artifacts[PARAMS_ARTIFACT]).read_text())
        self.params = PredictParams.parse(raw, "predict")

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None
                ) -> pd.DataFrame:
        return classify_encoded(model_input, self.model, self.params)


def log_raw_image_model(keras_file: str | Path, params: PredictParams,
                        name: str = "raw_images") -> str:
    """Logs the pyfunc model to the active MLflow run; returns its URI. The prediction
    settings are stored with it (Grad-CAM off: a service returns numbers)."""
    import mlflow  # noqa: PLC0415  (lazy: MLflow loads only when a model is logged)

    from neuroblastoma_cnn.datasets.keras_model import pip_requirements  # noqa: PLC0415

    settings = params.model_copy(update={"gradcam": False, "workers": 1})
    with tempfile.TemporaryDirectory() as tmp:
        params_file = Path(tmp) / "predict_params.json"
        params_file.write_text(json.dumps(settings.model_dump(mode="json")))
        info = mlflow.pyfunc.log_model(
            name=name, python_model=RawImageModel(),
            artifacts={MODEL_ARTIFACT: str(keras_file), PARAMS_ARTIFACT: str(params_file)},
            pip_requirements=pip_requirements())
    logger.info("Logged raw-image pyfunc model: %s", info.model_uri)
    return info.model_uri
