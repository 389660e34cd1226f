"""``mlflow models serve`` end to end: the real scoring server on 127.0.0.1, started from the
raw-image pyfunc logged to a SQLite store, answers a JPEG, a PNG, a truncated JPEG, a text file
empty requests, a memory-bomb PNG and a request over ``predict.max_request_bytes``; images get
the probabilities ``neuroblastoma-cnn predict`` gives on the same
files (to 1e-5), bad rows their error, and the server keeps answering."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from _browser import free_port, serving
from _hostile import bomb_png
from _params import params, store_metadata
from PIL import Image

from neuroblastoma_cnn.datasets.keras_model import save_keras_model
from neuroblastoma_cnn.images.preprocessing import Preprocessing
from neuroblastoma_cnn.serving.pyfunc import log_raw_image_model

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

BIN = Path(sys.executable).parent
CLASSES = ["a", "b", "c"]


def _model() -> keras.Model:
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(keras.layers.Rescaling(1 / 255)(inputs))
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x), name="tiny")
    model.preprocessing = Preprocessing.from_metadata(store_metadata(CLASSES, 16, 32), "t") \
        .model_copy(update={"architecture": "resnet34"})
    return model


def _tissue(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pixels = np.empty((96, 128, 3), np.uint8)
    pixels[:] = (225, 160, 200)
    nuclei = rng.random((96, 128)) < 0.3
    pixels[nuclei] = (90 + 40 * seed, 50, 140)
    return pixels


def _files(folder: Path) -> dict[str, Path]:
    folder.mkdir()
    files = {"tissue.jpg": folder / "tissue.jpg", "tissue.png": folder / "tissue.png",
             "truncated.jpg": folder / "truncated.jpg", "notes.txt": folder / "notes.txt"}
    Image.fromarray(_tissue(0)).save(files["tissue.jpg"], quality=90)
    Image.fromarray(_tissue(1)).save(files["tissue.png"])
    data = files["tissue.jpg"].read_bytes()
    files["truncated.jpg"].write_bytes(data[: len(data) // 2])
    files["notes.txt"].write_text("not an image\n")
    return files


def _post(port: int, body: bytes) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _frame_body(rows: list[list[str]]) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["file", "image"], "data": rows}}).encode()


def _cli_predictions(model_file: Path, files: dict[str, Path], out: Path) -> pd.DataFrame:
    result = subprocess.run(
        [str(BIN / "neuroblastoma-cnn"), "predict", "-m", str(model_file), "--batch-size", "32",
         "-o", str(out), *map(str, files.values())],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.exists(), result.stdout + result.stderr
    table = pd.read_csv(out, keep_default_na=False)
    return table.assign(file=[Path(f).name for f in table["file"]]).set_index("file")


def test_mlflow_models_serve_answers_images_and_bad_rows_like_predict(tmp_path):
    model_file = tmp_path / "model.keras"
    save_keras_model(_model(), model_file)
    files = _files(tmp_path / "images")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    mlflow.set_experiment("serving_test")
    with mlflow.start_run():
        uri = log_raw_image_model(model_file, params("predict", batch_size=32,
                                                     max_request_bytes=200_000),
                                  name="resnet34_raw_images")

    expected = _cli_predictions(model_file, files, tmp_path / "cli.csv")

    port = free_port()
    command = [str(BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # its uvicorn
    with serving(command, f"http://127.0.0.1:{port}/ping", tmp_path, tmp_path / "server.log",
                 env=env, timeout=240):
        rows = [[name, base64.b64encode(path.read_bytes()).decode()]
                for name, path in files.items()]
        status, text = _post(port, _frame_body(rows))
        assert status == 200, text
        served = pd.DataFrame(json.loads(text)["predictions"]).set_index("file")
        assert list(served.index) == list(files)

        for name in ("tissue.jpg", "tissue.png"):
            assert served.loc[name, "error"] == "" and not expected.loc[name, "reason"]
            assert served.loc[name, "predicted"] == expected.loc[name, "predicted"]
            assert served.loc[name, "n_tiles"] == int(expected.loc[name, "n_tiles"]) >= 1
            for column in (f"prob_{c}" for c in CLASSES):
                assert served.loc[name, column] == pytest.approx(
                    float(expected.loc[name, column]), abs=1e-5)
        for name in ("truncated.jpg", "notes.txt"):  # the reason predict gives, as the error
            assert served.loc[name, "error"] == expected.loc[name, "reason"] != ""
            assert served.loc[name, "n_tiles"] == 0

        bomb = [["bomb.png", base64.b64encode(bomb_png()).decode()]]
        status, text = _post(port, _frame_body(bomb))  # 10^10 pixels declared: refused unread
        assert status == 200, text
        assert json.loads(text)["predictions"][0]["error"].startswith(
            "decompression bomb: 100000x100000"), text
        many = [[f"bomb{i}.png", bomb[0][1]] for i in range(80)]  # 80 x 3.2 KB
        status, text = _post(port, _frame_body(many))
        assert status == 400 and "more than predict.max_request_bytes = 200000" in text, text

        status, text = _post(port, _frame_body([]))  # no rows: no predictions, no failure
        assert status == 200 and json.loads(text)["predictions"] == [], text
        status, text = _post(port, b"")  # no body at all: a client error that says so
        assert 400 <= status < 500 and text, text

        status, text = _post(port, _frame_body(rows[:1]))  # still answering afterwards
        assert status == 200, text
        again = json.loads(text)["predictions"][0]
        assert again["prob_a"] == pytest.approx(served.loc["tissue.jpg", "prob_a"], abs=1e-6)
