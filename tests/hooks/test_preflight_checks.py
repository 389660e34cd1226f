"""Pre-flight checks: each names the problem and what to do, in one line, in well under a
second (the network check at most its timeout)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from kedro.pipeline import Node, Pipeline

from neuroblastoma_cnn.core.errors import DataError, ModelError, ParameterError, ProjectError
from neuroblastoma_cnn.hooks import preflight
from neuroblastoma_cnn.models.resnet50 import IMAGENET_FILE


def _conf(tmp_path: Path, *envs: str) -> Path:
    for env in envs:
        (tmp_path / "conf" / env).mkdir(parents=True)
    return tmp_path / "conf"


def test_a_mistyped_environment_names_it_and_lists_the_others(tmp_path):
    conf = _conf(tmp_path, "base", "local", "tiny", "demo")
    preflight.check_environment(conf, "tiny", "local")
    preflight.check_environment(conf, None, "local")
    with pytest.raises(ProjectError) as caught:
        preflight.check_environment(conf, "tinyy", "local")
    line = caught.value.one_line()
    assert "Environment 'tinyy' does not exist" in line
    assert "Environments: demo, local, tiny" in line
    assert "\n" not in line


def test_only_the_tensorflow_backend_passes():
    preflight.check_keras_backend({})
    preflight.check_keras_backend({"KERAS_BACKEND": "TensorFlow"})
    for other in ("jax", "torch", "numpy"):
        with pytest.raises(ParameterError) as caught:
            preflight.check_keras_backend({"KERAS_BACKEND": other})
        line = caught.value.one_line()
        assert f"KERAS_BACKEND={other}:" in line and "set it to tensorflow" in line
        assert "\n" not in line


def test_the_default_environment_may_be_absent(tmp_path):
    """conf/local is git-ignored: a fresh clone runs on base alone."""
    conf = _conf(tmp_path, "base")
    preflight.check_environment(conf, "local", "local")
    with pytest.raises(ProjectError) as caught:
        preflight.check_environment(_conf(tmp_path / "x", "base", "tiny"), "tinyy", "local")
    assert caught.value.hint == "run with --env=tiny"


def test_raw_folder_must_exist_and_hold_an_image(tmp_path):
    raw = tmp_path / "images"
    with pytest.raises(DataError, match="does not exist") as caught:
        preflight.check_raw_images(raw, [".png"], demo_env=True)
    assert "<Class>/<Patient>/<image>" in caught.value.one_line()
    assert "kedro run --env=demo" in caught.value.one_line()
    (raw / "A" / "p1").mkdir(parents=True)
    (raw / "A" / "p1" / "notes.txt").write_text("x")
    (raw / "A" / "p1" / ".hidden.png").write_bytes(b"x")
    with pytest.raises(DataError, match=r"No image in .*\.png") as caught:
        preflight.check_raw_images(raw, [".png"])
    assert "--env=demo" not in caught.value.one_line()
    (raw / "A" / "p1" / "IMG.PNG").write_bytes(b"x")  # extensions match in any case
    preflight.check_raw_images(raw, [".png"])


def test_a_missing_weights_file_is_a_parameter_error(tmp_path):
    with pytest.raises(ParameterError, match=r"resnet50.model.weights='.*w\.h5': no such"):
        preflight.check_weights("resnet50.model.weights", str(tmp_path / "w.h5"))
    (tmp_path / "w.h5").write_bytes(b"x")
    preflight.check_weights("resnet50.model.weights", str(tmp_path / "w.h5"))
    preflight.check_weights("resnet50.model.weights", None)


def test_imagenet_weights_need_the_cache_or_the_network(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(preflight, "url_reachable", lambda url, timeout=5.0: False)
    started = time.perf_counter()
    with pytest.raises(ModelError, match="cannot be reached") as caught:
        preflight.check_weights("resnet50.model.weights", "imagenet")
    assert time.perf_counter() - started < 1.0
    assert str(tmp_path / "keras" / "models" / IMAGENET_FILE) in caught.value.one_line()
    monkeypatch.setattr(preflight, "url_reachable", lambda url, timeout=5.0: True)
    preflight.check_weights("resnet50.model.weights", "imagenet")  # downloadable: fine
    monkeypatch.setattr(preflight, "url_reachable", lambda url, timeout=5.0: False)
    cached = tmp_path / "keras" / "models" / IMAGENET_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    preflight.check_weights("resnet50.model.weights", "imagenet")  # cached: no network


def test_an_unroutable_address_is_unreachable_within_the_timeout():
    started = time.perf_counter()
    assert not preflight.url_reachable("http://127.0.0.1:9/nothing", timeout=1.0)
    assert time.perf_counter() - started < 3.0


def _node(name: str, *inputs: str) -> Node:
    return Node(lambda *args: None, inputs=list(inputs), outputs=f"{name}_out", name=name)


def test_weights_are_found_for_the_models_a_pipeline_builds():
    pipeline = Pipeline([
        _node("ingest", "raw_images", "params:ingestion"),
        _node("train50", "tiles", "params:resnet50.model", "params:resnet50.training"),
        _node("train34", "tiles", "params:resnet34.model"),
    ])
    parameters = {"resnet50": {"model": {"architecture": "resnet50", "weights": "imagenet"}},
                  "resnet34": {"model": {"architecture": "resnet34"}}}
    assert preflight.model_weight_params(pipeline, parameters) == [
        ("resnet50.model.weights", "imagenet")]
    only34 = Pipeline([_node("train34", "tiles", "params:resnet34.model")])
    assert preflight.model_weight_params(only34, parameters) == []
