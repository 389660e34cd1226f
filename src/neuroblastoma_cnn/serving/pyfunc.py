"""An MLflow pyfunc model that classifies raw image files: what ``mlflow models serve`` runs.

Why: the Keras flavour logged by training takes fixed-size float tiles, so a client would have
to decode, tile, normalise and average exactly as the project does. This wrapper takes the image
files themselves (base64 in a DataFrame column ``image``, optional ``file`` names; in process
also a ``path`` column of local files) and returns, per row, the image-level probabilities, the
predicted class, the number of tiles and an ``error`` (empty when the image was used), through
the same :func:`tiles.predict_files` as ``kedro run --pipeline=predict``: the model's own
preprocessing record (tiling, tissue rule, stain reference, temperature) decides everything,
and a bad file is an error row, never a failed request.

The logged model is self-contained: the ``.keras`` file (hard-linked to the catalog's file where
the store is local), the prediction settings, this package's code, a signature, an input example
and the project's runtime requirements pinned to the versions the run used.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neuroblastoma_cnn.analysis.conformal import REFER_COLUMN, SET_COLUMN
from neuroblastoma_cnn.analysis.predictions import probability_column
from neuroblastoma_cnn.analysis.tta import TTA_PREFIX
from neuroblastoma_cnn.images.decoding import image_format
from neuroblastoma_cnn.images.preprocessing import Preprocessing, preprocessing_of
from neuroblastoma_cnn.models import families
from neuroblastoma_cnn.models.families import Capability
from neuroblastoma_cnn.models.selected_floor import CLASSICAL_SUFFIX, load_classical
from neuroblastoma_cnn.params import PredictParams

from .tiles import predict_files

logger = logging.getLogger(__name__)

try:  # MLflow is a dependency; the base class only matters where a model is logged or served
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    PythonModel = object  # type: ignore[misc,assignment]

MODEL_ARTIFACT = "model"
PARAMS_ARTIFACT = "predict_params"
#: The logged pyfunc's name: the Keras model's name with this suffix (``resnet34_raw_images``).
NAME_SUFFIX = "_raw_images"
#: Input columns: ``image`` (base64 file bytes), ``file`` (names shown in the output) and, in
#: process only, ``path`` (a local file read directly: ``load_model(uri).unwrap_python_model()
#: .predict(None, frame)``). The logged signature has no ``path``, so MLflow drops that column
#: before a served request reaches the model: a client cannot make the server read its files.
INPUT_COLUMNS = ("file", "image", "path")
#: The project's runtime requirements that serving never imports (tracking UI, studies).
_NOT_FOR_SERVING = {"kedro-mlflow", "kedro-viz", "optuna"}


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
    return name + _FORMATS.get(image_format(data) or "", "")


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value)) \
        and str(value) != ""


def _row_names(frame: pd.DataFrame) -> list[str]:
    """``file`` where given, else the name of ``path``, else ``image_<i>``."""
    names = []
    for i in range(len(frame)):
        file = frame["file"].iloc[i] if "file" in frame.columns else None
        path = frame["path"].iloc[i] if "path" in frame.columns else None
        names.append(str(file) if _present(file) else
                     Path(str(path)).name if _present(path) else f"image_{i}")
    return names


def _stage(frame: pd.DataFrame, names: list[str], folder: Path
           ) -> tuple[list[tuple[str, Path]], list[str], dict[str, str]]:
    """The usable rows as ``(checked name, file)`` pairs for :func:`tiles.predict_files`
    (base64 written to ``folder``, paths used as they are), the row names they belong to (in
    the same order), and the errors of the other rows by name."""
    files: list[tuple[str, Path]] = []
    staged: list[str] = []
    errors: dict[str, str] = {}
    for i, name in enumerate(names):
        image = frame["image"].iloc[i] if "image" in frame.columns else None
        path = frame["path"].iloc[i] if "path" in frame.columns else None
        if _present(image):
            try:
                data = _decode(image)
            except (binascii.Error, ValueError, TypeError) as exc:
                errors[name] = f"not base64: {exc}"
                continue
            checked = _checked_name(name, data)
            file = folder / f"{i:06d}{Path(checked).suffix}"
            file.write_bytes(data)
        elif _present(path):
            file = Path(str(path))
            if not file.is_file():
                errors[name] = f"no such file: '{path}'"
                continue
            checked = name if Path(name).suffix else name + file.suffix
        else:
            errors[name] = "empty row: give the file's bytes (base64) in 'image'"
            continue
        files.append((checked, file))
        staged.append(name)
    return files, staged, errors


def output_columns(classes: list[str], tta: bool, sets: bool = False) -> list[str]:
    """``file, predicted, prob_<class>..., n_tiles, error`` (+ ``tta_predicted,
    tta_confidence`` with test-time augmentation, + ``prediction_set, refer`` where the model
    carries a conformal calibration)."""
    extra = [TTA_PREFIX + "predicted", TTA_PREFIX + "confidence"] if tta else []
    extra += [SET_COLUMN, REFER_COLUMN] if sets else []
    return ["file", "predicted", *(probability_column(c) for c in classes), "n_tiles", *extra,
            "error"]


def classify_encoded(frame: pd.DataFrame, model: Any, params: PredictParams) -> pd.DataFrame:
    """Rows of image files (see :data:`INPUT_COLUMNS`) -> :func:`output_columns`, one row per
    input row, in order; a row that cannot be used keeps its name and says why in ``error``."""
    if not set(INPUT_COLUMNS) & set(frame.columns) - {"file"} and len(frame):
        raise ValueError(f"Input needs a column 'image' (base64 file bytes); it has "
                         f"{list(frame.columns)}.")
    names = _row_names(frame)
    if len(set(names)) < len(names):
        raise ValueError("Input rows need distinct 'file' names (a name given twice cannot be "
                         "matched to its result).")
    preprocessing = preprocessing_of(model)
    classes = [str(c) for c in preprocessing.classes]
    sets = preprocessing.conformal is not None
    with tempfile.TemporaryDirectory(prefix="nbcnn-serve-") as tmp:
        files, staged, errors = _stage(frame, names, Path(tmp))
        predictions = predict_files(files, model, params)[0] if files else pd.DataFrame()
    # predict_files answers one row per file, in order: matched by position, not by name.
    results = dict(zip(staged, predictions.to_dict("records"), strict=True))
    out = [_output_row(name, errors.get(name, ""), results.get(name), classes, params.tta,
                       sets) for name in names]
    return pd.DataFrame(out, columns=output_columns(classes, params.tta, sets))


def _output_row(name: str, error: str, found: dict[str, Any] | None, classes: list[str],
                tta: bool, sets: bool = False) -> dict[str, Any]:
    row: dict[str, Any] = {"file": name, "predicted": "", "n_tiles": 0, "error": error}
    row.update({probability_column(c): np.nan for c in classes})
    if sets:  # a file that could not be used is referred, with no set
        row.update({SET_COLUMN: "", REFER_COLUMN: True})
    if found is None:
        return row
    row["error"] = str(found["reason"]) if bool(found["rejected"]) else ""
    row["predicted"] = str(found["predicted"])
    row["n_tiles"] = 0 if pd.isna(found["n_tiles"]) else int(found["n_tiles"])
    row.update({probability_column(c): float(found[probability_column(c)]) for c in classes})
    if tta:
        for column in (TTA_PREFIX + "predicted", TTA_PREFIX + "confidence"):
            row[column] = found[column]
    if sets:
        row.update({SET_COLUMN: str(found[SET_COLUMN]), REFER_COLUMN: bool(found[REFER_COLUMN])})
    return row


#: Settings a model logged before they existed is served with: no lower pixel limit than its
#: record's, no request size limit (what it did then).
_SETTINGS_ADDED_LATER = {"max_image_pixels": None, "max_request_bytes": None}


def request_bytes(frame: pd.DataFrame) -> int:
    """The size of a request's images as sent (base64 text, or bytes)."""
    if "image" not in frame.columns:
        return 0
    return sum(len(v) for v in frame["image"] if isinstance(v, (str, bytes, bytearray)))


def check_request_size(frame: pd.DataFrame, limit: int | None) -> None:
    """Raises ``ValueError`` naming ``predict.max_request_bytes`` for a request over it."""
    size = request_bytes(frame)
    if limit is not None and size > limit:
        raise ValueError(
            f"Request refused: its {len(frame)} image(s) total {size} bytes, more than "
            f"predict.max_request_bytes = {limit}; send fewer images per request.")


class RawImageModel(PythonModel):
    """The pyfunc model: a saved model (``.keras`` with its record, or a classical or hybrid
    ``.joblib``), and the prediction settings."""

    def load_context(self, context: Any) -> None:
        from neuroblastoma_cnn.datasets import load_model_file  # noqa: PLC0415

        self.model = load_model_file(context.artifacts[MODEL_ARTIFACT])
        raw = json.loads(Path(context.artifacts[PARAMS_ARTIFACT]).read_text())
        self.params = PredictParams.parse({**_SETTINGS_ADDED_LATER, **raw}, "predict")

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None
                ) -> pd.DataFrame:
        """A request over the size limit is refused whole (status 400 with the reason, from
        MLflow's own error type); any other bad row answers with its reason."""
        try:
            check_request_size(model_input, self.params.max_request_bytes)
        except ValueError as exc:
            from mlflow.exceptions import MlflowException  # noqa: PLC0415

            raise MlflowException.invalid_parameter_value(str(exc)) from None
        return classify_encoded(model_input, self.model, self.params)


def _record_of(path: Path) -> dict[str, Any]:
    """The preprocessing record inside a model file, as plain JSON."""
    if path.suffix == CLASSICAL_SUFFIX:
        return load_classical(path).preprocessing.to_dict()
    from neuroblastoma_cnn.datasets.keras_model import read_record  # noqa: PLC0415

    return read_record(path)


def serving_requirements() -> list[str]:
    """The project's runtime requirements, each pinned to the version installed in this run
    (those serving never imports left out): what ``mlflow models serve`` installs."""
    from neuroblastoma_cnn.datasets.keras_model import pip_requirements  # noqa: PLC0415

    pinned = {r.split("==")[0]: r for r in pip_requirements()}  # Keras and the TF build
    for requirement in metadata.requires("neuroblastoma-cnn") or []:
        if "extra ==" in requirement:
            continue
        name = requirement.split(";")[0].split("[")[0]
        for mark in "<>=!~ ":
            name = name.split(mark)[0]
        if name.startswith("tensorflow") or name in _NOT_FOR_SERVING or name in pinned:
            continue
        try:
            pinned[name] = f"{name}=={metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue  # a requirement for another platform
    return sorted(pinned.values())


def _example_png(side: int) -> str:
    """A tissue-coloured PNG (pink and purple stripes) of one tile: the logged input example."""
    from PIL import Image  # noqa: PLC0415

    pixels = np.zeros((side, side, 3), np.uint8)
    pixels[:] = (232, 170, 205)
    pixels[::4] = (110, 60, 150)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _example_side(preprocessing: Preprocessing) -> int:
    """The smallest square image the model's checks accept whole (one tile, min size)."""
    tiling = preprocessing.tiling
    return max(preprocessing.image_checks.min_image_size, tiling.tile_size or 0,
               tiling.input_size)


def _signature(classes: list[str], tta: bool, sets: bool = False) -> Any:
    from mlflow.models import ModelSignature  # noqa: PLC0415  (lazy: MLflow)
    from mlflow.types import ColSpec, Schema  # noqa: PLC0415

    inputs = Schema([ColSpec("string", column, required=column == "image")
                     for column in ("file", "image")])
    types = {"n_tiles": "long", TTA_PREFIX + "confidence": "double", REFER_COLUMN: "boolean"}
    outputs = Schema([ColSpec(types.get(c, "double" if c.startswith("prob_") else "string"), c)
                      for c in output_columns(classes, tta, sets)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _package_code(folder: Path) -> Path:
    """A copy of this package (no caches) for the logged model's ``code`` folder, so the model
    loads where the project is not installed."""
    import neuroblastoma_cnn  # noqa: PLC0415

    source = Path(neuroblastoma_cnn.__file__).parent
    target = folder / source.name
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def log_raw_image_model(keras_file: str | Path, params: PredictParams,
                        name: str = "raw_images") -> str:
    """Logs the pyfunc model to the active MLflow run; returns its URI. The prediction
    settings are stored with it (Grad-CAM off: a service returns numbers)."""
    import mlflow  # noqa: PLC0415  (lazy: MLflow loads only when a model is logged)

    from neuroblastoma_cnn.datasets.keras_model import (  # noqa: PLC0415
        link_artifact_to_source,
    )

    settings = params.model_copy(update={"gradcam": False, "workers": 1, "head": None})
    record = _record_of(Path(keras_file))
    preprocessing = Preprocessing.from_dict(record, where=str(keras_file))
    families.family(preprocessing.architecture or "").require(Capability.SERVE)
    classes = [str(c) for c in preprocessing.classes]
    example = pd.DataFrame({"file": ["example.png"],
                            "image": [_example_png(_example_side(preprocessing))]})
    with tempfile.TemporaryDirectory() as tmp:
        params_file = Path(tmp) / "predict_params.json"
        params_file.write_text(json.dumps(settings.model_dump(mode="json")))
        info = mlflow.pyfunc.log_model(
            name=name, python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={MODEL_ARTIFACT: str(keras_file), PARAMS_ARTIFACT: str(params_file)},
            code_paths=[str(_package_code(Path(tmp)))],
            signature=_signature(classes, settings.tta, preprocessing.conformal is not None),
            input_example=example,
            pip_requirements=serving_requirements(),
            metadata={"preprocessing": record, "input": "raw image files (base64)"})
    _link_keras_artifact(info, Path(keras_file), link_artifact_to_source)
    mlflow.set_tag(f"{name}.model_uri", info.model_uri)
    logger.info("Logged raw-image pyfunc model: %s", info.model_uri)
    return info.model_uri


def _link_keras_artifact(info: Any, source: Path, link: Any) -> None:
    """The logged copy of the ``.keras`` file becomes a hard link of the catalog's file (one
    copy of the weights on disk), where the store is a local folder."""
    import mlflow  # noqa: PLC0415

    from neuroblastoma_cnn.datasets.keras_model import local_artifact_dir  # noqa: PLC0415

    try:
        folder = local_artifact_dir(mlflow.get_logged_model(info.model_id).artifact_location)
    except Exception as exc:  # an older or remote store: keep the copy
        logger.info("Raw-image model keeps its own copy of the weights: %s", exc)
        return
    artifact = folder / "artifacts" / source.name if folder else None
    if artifact is not None and artifact.is_file():
        link(artifact, source)
