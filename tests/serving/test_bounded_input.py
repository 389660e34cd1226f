"""Hostile input is refused cheaply: an image whose header declares more pixels than the limit
is refused before decoding (the decoder, the served model, the command line), naming the file
and the parameter; a served request over ``predict.max_request_bytes`` is refused with the
reason, and the model keeps answering."""

from __future__ import annotations

import base64
import resource
import time

import keras
import numpy as np
import pandas as pd
import pytest
from _hostile import bad_images, bomb_png, encoded
from _params import params, store_metadata
from click.testing import CliRunner
from mlflow.exceptions import MlflowException
from PIL import Image

from neuroblastoma_cnn.cli.commands import main, main_group
from neuroblastoma_cnn.core.errors import ParameterError
from neuroblastoma_cnn.datasets.keras_model import save_keras_model
from neuroblastoma_cnn.images.decoding import ImageChecks, ImageRejected, decode_image, image_format
from neuroblastoma_cnn.images.preprocessing import Preprocessing
from neuroblastoma_cnn.serving.pyfunc import RawImageModel, classify_encoded


def _model() -> keras.Model:
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 255)(keras.layers.GlobalAveragePooling2D()(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x), name="tiny")
    model.preprocessing = Preprocessing.from_metadata(store_metadata(["a", "b"], 16), "t") \
        .model_copy(update={"architecture": "resnet34"})
    return model


def _tissue() -> bytes:
    pixels = np.full((80, 96, 3), 120, np.uint8)
    pixels[::2, ::3] = (200, 60, 160)
    return encoded(pixels, "JPEG")


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_bomb_is_refused_from_its_header_without_memory():
    bomb = bomb_png()  # 10^10 pixels declared, a few KB on disk
    assert len(bomb) < 5000
    before, started = _max_rss_mb(), time.perf_counter()
    with pytest.raises(ImageRejected) as caught:
        decode_image(bomb, "bomb.png", 250_000_000)
    assert time.perf_counter() - started < 2 and _max_rss_mb() - before < 100
    assert caught.value.one_line() == (
        "'bomb.png': decompression bomb: 100000x100000 = 10000000000 pixels is more than "
        "ingestion.max_image_pixels = 250000000 (refused before decoding; raise "
        "ingestion.max_image_pixels if such images are expected)")


def test_header_probe_survives_pillows_own_bomb_error():
    """Pillow raises DecompressionBombError (not an OSError) from Image.open on a huge header;
    naming a served row by its format must not let it escape as a failed request."""
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's default guard is on here
    assert image_format(bomb_png()) == "PNG"
    assert image_format(b"not an image") is None and image_format(b"") is None


def test_limit_must_be_positive():
    with pytest.raises(ParameterError, match="max_image_pixels"):
        params("predict", max_image_pixels=0)
    with pytest.raises(ParameterError, match="max_request_bytes"):
        params("predict", max_request_bytes=-1)
    with pytest.raises(Exception, match="max_image_pixels"):
        ImageChecks(extensions=[".png"], max_image_pixels=0, min_image_size=1)


def test_served_rows_answer_every_bad_image_with_its_reason():
    model, good = _model(), _tissue()
    files = {"good.jpg": good, **bad_images(good), "bomb": bomb_png()}  # "bomb": no extension
    frame = pd.DataFrame({"file": list(files),
                          "image": [base64.b64encode(v).decode() for v in files.values()]})
    before = _max_rss_mb()
    out = classify_encoded(frame, model, params("predict", gradcam=False, workers=2))
    assert _max_rss_mb() - before < 200
    errors = dict(zip(out["file"], out["error"], strict=True))
    assert errors["good.jpg"] == ""
    assert all(errors[name] for name in files if name != "good.jpg"), errors
    for name in ("bomb.png", "bomb"):
        assert errors[name].startswith("decompression bomb: 100000x100000"), errors[name]
        assert "the model's ingestion.max_image_pixels (or predict.max_image_pixels)" \
            in errors[name]
    assert errors["one_pixel.png"].startswith("too small")

    lowered = classify_encoded(frame.iloc[:1], model,
                               params("predict", gradcam=False, max_image_pixels=100))
    assert lowered.loc[0, "error"].startswith("decompression bomb: 96x80 = 7680 pixels is more "
                                              "than predict.max_image_pixels = 100")


def test_request_over_the_size_limit_is_refused_and_the_model_keeps_answering():
    served = RawImageModel()
    served.model = _model()
    served.params = params("predict", gradcam=False, workers=1, max_request_bytes=4000)
    image = base64.b64encode(_tissue()).decode()
    big = pd.DataFrame({"file": [f"{i}.jpg" for i in range(3)], "image": [image] * 3})
    assert len(image) * 3 > 4000 > len(image)
    with pytest.raises(MlflowException) as caught:
        served.predict(None, big)
    assert caught.value.get_http_status_code() == 400
    assert "more than predict.max_request_bytes = 4000" in caught.value.message
    out = served.predict(None, big.iloc[:1])
    assert out.loc[0, "error"] == "" and out.loc[0, "n_tiles"] >= 1


def test_command_line_refuses_the_bomb_and_a_bad_limit(tmp_path, capsys):
    save_keras_model(_model(), tmp_path / "model.keras")
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    (tmp_path / "good.jpg").write_bytes(_tissue())
    out = tmp_path / "out.csv"
    result = CliRunner().invoke(main_group, [
        "predict", "-m", str(tmp_path / "model.keras"), "-q", "-o", str(out),
        str(tmp_path / "bomb.png"), str(tmp_path / "good.jpg")])
    table = pd.read_csv(out, keep_default_na=False).set_index("file")
    reason = table.loc[str(tmp_path / "bomb.png"), "reason"]
    assert reason.startswith("decompression bomb: 100000x100000"), result.output
    assert main(["predict", "-m", str(tmp_path / "model.keras"), "--max-image-pixels", "0",
                 str(tmp_path / "good.jpg")]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "error: predict.max_image_pixels = 0: must be >= 1")
