"""The raw-image pyfunc model: base64 files in a DataFrame -> per-image probabilities, class,
tile count and a per-row error, through the same prediction code and the model's own record."""

from __future__ import annotations

import base64
import io

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from _params import params, store_metadata
from PIL import Image

from neuroblastoma_cnn.core.preprocessing import Preprocessing
from neuroblastoma_cnn.datasets.keras_model import save_keras_model
from neuroblastoma_cnn.pipelines.predict import nodes
from neuroblastoma_cnn.pipelines.predict.pyfunc import classify_encoded, log_raw_image_model


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
