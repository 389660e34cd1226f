"""Fold ensembles: one Keras model averaging its members, used everywhere like a single model.

Most tests use a tiny CNN (conv -> pooling -> softmax Dense, the shape of the project's ResNets
at a fraction of the cost); one builds real ResNet34 members. Untrained weights suffice: what is
checked is arithmetic (the mean), the file format and the refusals, not skill.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from _params import params, store_metadata
from PIL import Image

from neuroblastoma_cnn.analysis.gradcam import GradCam, image_gradcam
from neuroblastoma_cnn.cli.commands import main
from neuroblastoma_cnn.core.errors import ModelError, ParameterError
from neuroblastoma_cnn.datasets import load_keras_model, save_keras_model
from neuroblastoma_cnn.images.decoding import TilingConfig
from neuroblastoma_cnn.images.preprocessing import Preprocessing, attach_preprocessing
from neuroblastoma_cnn.models.ensemble import (
    build_ensemble,
    check_members,
    ensemble_members,
    ensemble_weights,
    is_ensemble,
)
from neuroblastoma_cnn.models.families import build_model
from neuroblastoma_cnn.pipelines.predict.nodes import predict_files

CLASSES = ["a", "b", "c"]
SIZE = 32
SOURCES = ["folds/0.keras", "folds/1.keras", "folds/2.keras"]


def tiny_cnn(seed: int, size: int = SIZE, n_classes: int = len(CLASSES)) -> keras.Model:
    inputs = keras.Input((size, size, 3), name="image")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, strides=4, activation="relu",
                            kernel_initializer=keras.initializers.GlorotUniform(seed))(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="predictions",
                                 kernel_initializer=keras.initializers.GlorotUniform(seed + 1))(x)
    return keras.Model(inputs, outputs, name="tiny")


def record(classes: list[str] = CLASSES, size: int = SIZE, tile_size: int | None = SIZE,
           **update: object) -> Preprocessing:
    return Preprocessing.from_dict(store_metadata(classes, size, tile_size)).model_copy(
        update={"architecture": "resnet34", **update})


def member(seed: int, classes: list[str] = CLASSES, size: int = SIZE, **update: object
           ) -> keras.Model:
    model = tiny_cnn(seed, size, len(classes))
    attach_preprocessing(model, record(classes, size, **update), f"member {seed}")
    return model


def tiles(n: int = 5, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def members() -> list[keras.Model]:
    return [member(seed) for seed in (0, 10, 20)]


@pytest.fixture(scope="module")
def ensemble(members) -> keras.Model:
    return build_ensemble(members, [1.0, 3.0, 0.5])


@pytest.fixture(scope="module")
def saved(ensemble, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ensemble") / "model.keras"
    save_keras_model(ensemble, path)
    return path


@pytest.fixture
def image_files(tmp_path: Path) -> list[tuple[str, Path]]:
    """Two tissue-coloured 96x64 PNGs: six 32 px tiles each."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    out = []
    for i in range(2):
        pixels = np.clip(rng.normal((110, 60, 140), 25, (64, 96, 3)), 0, 255).astype(np.uint8)
        path = folder / f"img{i}.png"
        Image.fromarray(pixels).save(path)
        out.append((path.name, path))
    return out


# ----------------------------------------------------------------------------- the mean


@pytest.mark.parametrize("weights", [None, [2.0, 1.0, 1.0], [0.0, 5.0, 1.0]])
def test_output_is_the_weighted_mean_of_the_members(members, weights) -> None:
    ensemble = build_ensemble(members, weights)
    shares = np.full(3, 1 / 3) if weights is None else np.asarray(weights) / sum(weights)
    x = tiles()
    expected = sum(w * m.predict_on_batch(x) for w, m in zip(shares, members, strict=True))
    got = ensemble.predict_on_batch(x)
    assert got.dtype == np.float32 and got.shape == (5, 3)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert ensemble_weights(ensemble) == pytest.approx(shares.tolist())
    assert is_ensemble(ensemble) and not any(is_ensemble(m) for m in members)
    assert [m.name for m in ensemble_members(ensemble)] == ["member_0", "member_1", "member_2"]
    assert ensemble.preprocessing == record()  # the members' common record


def test_output_is_float32_under_mixed_precision() -> None:
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        ensemble = build_ensemble([member(1), member(2)])
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert ensemble.layers[-1].compute_dtype == "float32"
    assert ensemble.predict_on_batch(tiles(2)).dtype == np.float32


# ----------------------------------------------------------------------------- the file


def test_saved_ensemble_loads_with_the_same_outputs_and_record(ensemble, saved) -> None:
    loaded = load_keras_model(saved)
    x = tiles(seed=1)
    np.testing.assert_array_equal(loaded.predict_on_batch(x), ensemble.predict_on_batch(x))
    assert loaded.preprocessing == ensemble.preprocessing
    assert is_ensemble(loaded) and ensemble_weights(loaded) == ensemble_weights(ensemble)
    for original, copy in zip(ensemble_members(ensemble), ensemble_members(loaded), strict=True):
        np.testing.assert_array_equal(copy.predict_on_batch(x), original.predict_on_batch(x))


@pytest.mark.integration
def test_saved_ensemble_loads_in_a_fresh_process(ensemble, saved, tmp_path) -> None:
    """No custom_objects: importing the package's loader registers the layer."""
    np.save(tmp_path / "x.npy", tiles(seed=2))
    code = textwrap.dedent(f"""
        import json, numpy as np
        from neuroblastoma_cnn.datasets import load_keras_model
        model = load_keras_model({str(saved)!r})
        x = np.load({str(tmp_path / "x.npy")!r})
        print(json.dumps({{"p": model.predict_on_batch(x).tolist(),
                          "record": model.preprocessing.to_dict()}}))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(out["p"], ensemble.predict_on_batch(tiles(seed=2)), atol=1e-6)
    assert out["record"] == ensemble.preprocessing.to_dict()


# ----------------------------------------------------------------------------- refusals

REFUSALS = {
    "classes": (lambda: member(5, classes=["a", "b", "d"]), 1, "classes = ['a', 'b', 'd']"),
    "class order": (lambda: member(5, classes=["b", "a", "c"]), 2, "classes = ['b', 'a', 'c']"),
    "input size": (lambda: member(5, size=40), 1, "takes inputs (40, 40, 3)"),
    "outputs": (lambda: member(5, classes=["a", "b"]), 2, "has 2 outputs"),
    "tiling": (lambda: member(5, tile_size=64), 1, "tiling.tile_size = 64, not 32"),
    "stain": (lambda: member(5, stain_reference={"method": "reinhard"}), 2, "stain_reference ="),
    "architecture": (lambda: member(5, architecture="resnet50"), 1, "architecture = 'resnet50'"),
    "no record": (lambda: tiny_cnn(5), 2, "carries no preprocessing record"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_members_preprocessed_differently_are_refused(members, case) -> None:
    make, index, expected = REFUSALS[case]
    group = list(members)
    group[index] = make()
    with pytest.raises(ModelError) as raised:
        build_ensemble(group, sources=SOURCES)
    line = raised.value.one_line()
    assert f"Ensemble member {index} ('{SOURCES[index]}')" in line
    assert expected in line
    assert "\n" not in line and raised.value.hint  # what to do, on the same line
    with pytest.raises(ModelError, match=f"Ensemble member {index}"):  # also without sources
        check_members(group)


def test_one_member_is_refused(members) -> None:
    with pytest.raises(ModelError, match="at least 2 members, got 1"):
        build_ensemble(members[:1])


@pytest.mark.parametrize("weights", [[1.0, 1.0], [1.0, -1.0, 1.0], [0.0, 0.0, 0.0],
                                     [1.0, float("nan"), 1.0]])
def test_bad_weights_are_refused(members, weights) -> None:
    with pytest.raises(ParameterError, match=r"(?i)ensemble weights"):
        build_ensemble(members, weights)


# ----------------------------------------------------------------------------- Grad-CAM


def test_gradcam_is_the_weighted_mean_of_the_members_maps(members, saved) -> None:
    loaded = load_keras_model(saved)  # members found again after a save and load
    x = tiles(4, seed=3)
    shares = ensemble_weights(loaded)
    cam, alone = GradCam(loaded, batch_size=3), [GradCam(m, batch_size=3) for m in members]
    for class_index in range(3):
        maps = cam.tile_maps(x, class_index)
        expected = sum(w * c.tile_maps(x, class_index) for w, c in zip(shares, alone, strict=True))
        assert maps.shape == (4, 8, 8) and maps.dtype == np.float32
        np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-6)
    assert maps.max() > 0
    image = np.clip(np.random.default_rng(4).normal(120, 40, (64, 96, 3)), 0, 255)
    config = TilingConfig.model_validate(
        {**params("ingestion").tiling.model_dump(), "tile_size": 32, "input_size": SIZE,
         "min_tissue_fraction": 0.0})
    heat, covered = image_gradcam(cam, image.astype(np.uint8), config, 1, 2)
    assert heat.shape == covered.shape == (64, 96) and covered.all()


@pytest.mark.slow
def test_resnet34_members_average_and_explain() -> None:
    """The project's own network: nested in the ensemble, its conv5 map is found per member."""
    group = [build_model("resnet34", 64, 3, seed=seed) for seed in (1, 2)]
    for model in group:
        attach_preprocessing(model, record(size=64, tile_size=64), "resnet34")
    ensemble = build_ensemble(group, [3.0, 1.0])
    x = tiles(2, size=64)
    expected = 0.75 * group[0].predict_on_batch(x) + 0.25 * group[1].predict_on_batch(x)
    np.testing.assert_allclose(ensemble.predict_on_batch(x), expected, atol=1e-6)
    cam = GradCam(ensemble, batch_size=2)
    assert cam.layer_name == "member_0/conv5_block3_out, member_1/conv5_block3_out"
    maps = [GradCam(m, batch_size=2).tile_maps(x, 2) for m in group]
    np.testing.assert_allclose(cam.tile_maps(x, 2), 0.75 * maps[0] + 0.25 * maps[1],
                               rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- prediction


def _prob(frame: pd.DataFrame, prefix: str = "") -> np.ndarray:
    return frame[[f"{prefix}prob_{c}" for c in CLASSES]].to_numpy(dtype=float)


def test_predict_files_gives_the_mean_of_the_members(members, ensemble, image_files) -> None:
    settings = params("predict", tta=True, workers=1, gradcam=False, batch_size=4)
    images, tile_rows = predict_files(image_files, ensemble, settings)
    alone = [predict_files(image_files, m, settings) for m in members]
    shares = ensemble_weights(ensemble)
    assert images["n_tiles"].tolist() == [6, 6] and not images["rejected"].any()
    for prefix in ("", "tta_"):
        expected = sum(w * _prob(t, prefix) for w, (_, t) in zip(shares, alone, strict=True))
        np.testing.assert_allclose(_prob(tile_rows, prefix), expected, atol=1e-6)
    expected = sum(w * _prob(p) for w, (p, _) in zip(shares, alone, strict=True))
    np.testing.assert_allclose(_prob(images), expected, atol=1e-6)
    assert images["model"].eq("fold_ensemble").all()


def test_cli_predicts_and_draws_with_a_saved_ensemble(members, ensemble, saved, image_files,
                                                      tmp_path) -> None:
    out, overlays = tmp_path / "predictions.csv", tmp_path / "gradcam"
    code = main(["predict", "-m", str(saved), str(image_files[0][1].parent), "-o", str(out),
                 "--gradcam", str(overlays), "--workers", "1", "-q"])
    assert code == 0
    rows = pd.read_csv(out)
    settings = params("predict", workers=1, gradcam=False)
    alone = [predict_files(image_files, m, settings)[0] for m in members]
    expected = sum(w * _prob(p) for w, p in zip(ensemble_weights(ensemble), alone, strict=True))
    np.testing.assert_allclose(_prob(rows), expected, atol=1e-6)
    assert sorted(p.name for p in overlays.iterdir()) == ["img0.png.png", "img1.png.png"]
