"""The raw-image pyfunc model: base64 files in a DataFrame -> per-image probabilities, class,
tile count and a per-row error, through the same prediction code and the model's own record."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from _params import params, store_metadata
from PIL import Image

from neuroblastoma_cnn.datasets.keras_model import load_keras_model, save_keras_model
from neuroblastoma_cnn.datasets.trained_models import TrainedModels
from neuroblastoma_cnn.images.preprocessing import Preprocessing
from neuroblastoma_cnn.pipelines.predict import nodes
from neuroblastoma_cnn.serving.pyfunc import classify_encoded, log_raw_image_model


def _model() -> keras.Model:
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 255)(keras.layers.GlobalAveragePooling2D()(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x), name="tiny")
    model.preprocessing = Preprocessing.from_metadata(store_metadata(["a", "b"], 16), "t") \
        .model_copy(update={"architecture": "resnet34"}).with_temperature(2.0)
    return model


def _png(level: int) -> str:
    pixels = np.full((80, 96, 3), level, np.uint8)
    pixels[::2, ::3] = (200, 60, 160)  # some "tissue" colour
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_rows_in_order_with_probabilities_and_errors(tmp_path):
    model = _model()
    frame = pd.DataFrame({"file": ["x.png", "bad.png", "y.png", "junk.png"],
                          "image": [_png(120), "not base64!", _png(90),
                                    base64.b64encode(b"not an image").decode()]})
    settings = params("predict", gradcam=False, workers=1)
    out = classify_encoded(frame, model, settings)
    assert list(out["file"]) == list(frame["file"])
    assert list(out.columns) == ["file", "predicted", "prob_a", "prob_b", "n_tiles", "error"]
    good = out.set_index("file").loc[["x.png", "y.png"]]
    assert (good["error"] == "").all() and (good["n_tiles"] >= 1).all()
    assert np.allclose(good[["prob_a", "prob_b"]].sum(axis=1), 1.0)
    assert out.set_index("file").loc["bad.png", "error"].startswith("not base64")
    assert out.set_index("file").loc["junk.png", "error"]  # rejected, with its reason
    # The same numbers as the project's own prediction of those files (temperature included).
    (tmp_path / "x.png").write_bytes(base64.b64decode(frame["image"][0]))
    direct, _ = nodes.predict_files([("x.png", tmp_path / "x.png")], model, settings)
    assert direct.loc[0, "prob_a"] == pytest.approx(good.loc["x.png", "prob_a"])


def test_logged_pyfunc_loads_and_predicts(tmp_path):
    model = _model()
    save_keras_model(model, tmp_path / "model.keras")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("pyfunc_test")
    with mlflow.start_run():
        uri = log_raw_image_model(tmp_path / "model.keras", params("predict"))
    served = mlflow.pyfunc.load_model(uri)
    out = served.predict(pd.DataFrame({"image": [_png(120)]}))
    assert out.loc[0, "file"] == "image_0" and out.loc[0, "error"] == ""
    assert out.loc[0, "predicted"] in {"a", "b"}


def test_logged_pyfunc_is_self_contained_and_loads_from_the_registry(tmp_path):
    """Signature, input example, the package code and pinned requirements travel with the
    model; in process a ``path`` column works too; a registered version loads for ``predict``
    (``models:/NAME/1``) as the same Keras model."""
    model = _model()
    save_keras_model(model, tmp_path / "model.keras")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("pyfunc_registry_test")
    with mlflow.start_run():
        uri = log_raw_image_model(tmp_path / "model.keras", params("predict"),
                                  name="resnet34_raw_images")
    info = mlflow.models.get_model_info(uri)
    assert info.signature.inputs.input_names() == ["file", "image"]
    assert info.signature.outputs.input_names() == ["file", "predicted", "prob_a", "prob_b",
                                                    "n_tiles", "error"]
    assert info.saved_input_example_info is not None
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "logged")))
    requirements = (local / "requirements.txt").read_text().split()
    assert any(r.startswith("keras==") for r in requirements)
    assert any(r.startswith("pandas==") for r in requirements)
    assert all("==" in r for r in requirements if not r.startswith("-"))
    assert (local / "code" / "neuroblastoma_cnn" / "serving" / "pyfunc.py").is_file()

    image = tmp_path / "x.png"
    image.write_bytes(base64.b64decode(_png(120)))
    served = mlflow.pyfunc.load_model(uri)
    # Paths only in process (the wrapped model itself): the signature the server enforces
    # drops a 'path' column, so a client cannot make the server read its files.
    in_process = served.unwrap_python_model()
    by_path = in_process.predict(None, pd.DataFrame({"path": [str(image),
                                                              str(tmp_path / "gone.png")]}))
    assert list(by_path["file"]) == ["x.png", "gone.png"]
    assert by_path.loc[0, "error"] == "" and by_path.loc[1, "error"].startswith("no such file")
    by_bytes = served.predict(pd.DataFrame({"file": ["x.png"], "image": [_png(120)],
                                            "path": [str(tmp_path / "model.keras")]}))
    assert by_bytes.loc[0, "error"] == ""
    assert by_path.loc[0, "prob_a"] == pytest.approx(by_bytes.loc[0, "prob_a"], abs=1e-6)

    version = mlflow.register_model(uri, "pyfunc_registry_test-resnet34").version
    loaded = TrainedModels("unused").load(f"models:/pyfunc_registry_test-resnet34/{version}")
    assert loaded.model_source == f"models:/pyfunc_registry_test-resnet34/{version}"
    assert loaded.preprocessing.temperature == 2.0 and loaded.preprocessing.classes == ("a", "b")
    tiles = np.random.default_rng(0).integers(0, 255, (2, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(loaded.predict_on_batch(tiles), model.predict_on_batch(tiles),
                               atol=1e-6)


def test_a_calibrated_model_answers_with_prediction_sets_everywhere(tmp_path):
    """A record carrying a conformal calibration adds prediction_set and refer to predict_files
    and to the pyfunc's answer (a file that cannot be used is referred with no set); the
    calibration survives saving and loading."""
    from neuroblastoma_cnn.analysis.conformal import ClassConditionalConformal  # noqa: PLC0415

    rng = np.random.default_rng(0)
    p_true = rng.uniform(0.3, 1.0, 40)
    truth = np.array([0, 1] * 20)
    prob = np.where(truth[:, None] == np.arange(2), p_true[:, None], 1 - p_true[:, None])
    calibration = ClassConditionalConformal(0.9).fit(prob, np.array(["a", "b"])[truth],
                                                     ["a", "b"], range(40)).to_record()
    model = _model()
    model.preprocessing = model.preprocessing.with_conformal(calibration)
    save_keras_model(model, tmp_path / "model.keras")
    model = load_keras_model(tmp_path / "model.keras")
    assert model.preprocessing.conformal == calibration
    frame = pd.DataFrame({"file": ["x.png", "bad.png"], "image": [_png(120), "not base64!"]})
    out = classify_encoded(frame, model, params("predict", gradcam=False, workers=1))
    assert list(out.columns)[-3:] == ["prediction_set", "refer", "error"]
    row = out.set_index("file").loc["x.png"]
    assert set(row["prediction_set"].split("|")) <= {"a", "b"}
    assert row["refer"] == (row["prediction_set"].count("|") != 0 or row["prediction_set"] == "")
    assert out.set_index("file").loc["bad.png", ["prediction_set", "refer"]].tolist() == ["", True]
    (tmp_path / "x.png").write_bytes(base64.b64decode(frame["image"][0]))
    direct, _ = nodes.predict_files([("x.png", tmp_path / "x.png")], model,
                                    params("predict", gradcam=False, workers=1))
    assert direct.loc[0, "prediction_set"] == row["prediction_set"]
