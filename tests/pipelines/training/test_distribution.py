"""Distribution rules (strategy, precision, XLA) and the float32 model saved after mixed
precision: decided without a GPU, carried out on CPU; the training parameters that choose them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import keras
import numpy as np
import pytest
from _params import params

from neuroblastoma_cnn.core.errors import ParameterError
from neuroblastoma_cnn.params import TrainingParams
from neuroblastoma_cnn.runtime import distribution as d

CLUSTER = json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                      "task": {"type": "worker", "index": 0}})


@pytest.mark.parametrize(("gpus", "tf_config", "expected"), [
    (0, None, d.Plan("one_device", "float32", False)),
    (1, None, d.Plan("one_device", "mixed_float16", True)),
    (4, None, d.Plan("mirrored", "mixed_float16", True)),
    (0, CLUSTER, d.Plan("multi_worker", "float32", False, workers=2)),
])
def test_auto_picks_by_machine(gpus, tf_config, expected):
    assert d.plan("auto", "auto", "auto", gpus=gpus, tf_config=tf_config) == expected


def test_auto_trains_in_bfloat16_on_a_cpu_that_multiplies_it_natively(tmp_path):
    assert d.plan("auto", "auto", "auto", gpus=0, tf_config=None, bf16_cpu=True) == d.Plan(
        "one_device", "mixed_bfloat16", False)
    assert d.plan("auto", "auto", "auto", gpus=1, tf_config=None, bf16_cpu=True).precision \
        == "mixed_float16"  # a GPU decides
    assert d.plan("auto", "float32", "auto", gpus=0, tf_config=None, bf16_cpu=True).precision \
        == "float32"  # an explicit choice stays
    cpuinfo = tmp_path / "cpuinfo"
    for flags, native in (("fpu avx2 fma", False), ("fpu avx512f avx512_bf16", True),
                          ("fpu amx_tile amx_bf16 amx_int8", True), ("fpu avx512f", False)):
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
        assert d.cpu_bf16(cpuinfo) is native, flags
    assert d.cpu_bf16(tmp_path / "missing") is False


def test_explicit_choices_and_bad_ones():
    assert d.plan("one_device", "float32", False, gpus=8, tf_config=None) == d.Plan(
        "one_device", "float32", False)
    with pytest.raises(ParameterError, match="needs TF_CONFIG"):
        d.plan("multi_worker", "auto", "auto", gpus=0, tf_config=None)
    with pytest.raises(ParameterError, match="precision"):
        d.plan("auto", "bfloat8", "auto", gpus=0, tf_config=None)
    assert d.scaled_learning_rate(1e-3, 4, scale=True) == pytest.approx(4e-3)
    assert d.scaled_learning_rate(1e-3, 4, scale=False) == 1e-3


def test_a_mixed_precision_model_is_saved_as_float32(tmp_path):
    previous = d.precision_policy(d.Plan("one_device", "mixed_float16", False))
    try:
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(4, 3)(inputs)
        x = keras.layers.Flatten()(x)
        outputs = keras.layers.Dense(2, activation="softmax", dtype="float32")(x)
        mixed = keras.Model(inputs, outputs)
    finally:
        keras.config.set_dtype_policy(previous)
    assert mixed.layers[1].compute_dtype == "float16"
    saved = d.as_float32(mixed)
    assert {layer.dtype_policy.name for layer in saved.layers} == {"float32"}
    batch = np.random.default_rng(0).uniform(0, 1, (2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(saved.predict_on_batch(batch), mixed.predict_on_batch(batch),
                               atol=2e-3)
    path = tmp_path / "m.keras"
    saved.save(path)
    reference = keras.Model.from_config(saved.get_config())
    assert [type(layer) for layer in reference.layers] == [type(layer) for layer in saved.layers]


def test_parameter_choices_come_from_one_list():
    fields = TrainingParams.model_fields
    assert get_args(fields["precision"].annotation) == d.PRECISIONS
    assert get_args(fields["distribution"].annotation) == d.DISTRIBUTIONS
    assert "mixed_bfloat16" in d.PRECISIONS
    assert d.plan("auto", "mixed_bfloat16", "auto", gpus=0, tf_config=None) == d.Plan(
        "one_device", "mixed_bfloat16", False)
    assert d.plan("auto", "auto", True, gpus=0, tf_config=None).jit_compile is True


@pytest.mark.parametrize(("key", "value"), [
    ("precision", "mixed_float61"), ("distribution", "mirored"), ("jit_compile", "yes"),
    ("scale_learning_rate", "true"),
])
def test_a_bad_training_setting_names_its_key(key, value):
    with pytest.raises(ParameterError, match=rf"resnet34\.training\.{key}"):
        params("resnet34.training", **{key: value})


def test_the_yaml_defaults_keep_one_device_on_a_cpu_in_its_fastest_exact_precision():
    for model in ("resnet34", "resnet50"):
        p = params(f"{model}.training")
        assert (p.distribution, p.precision, p.jit_compile, p.scale_learning_rate) == (
            "auto", "auto", "auto", False)
        for native, precision in ((False, "float32"), (True, "mixed_bfloat16")):
            assert d.plan(p.distribution, p.precision, p.jit_compile, gpus=0, tf_config=None,
                          bf16_cpu=native) == d.Plan("one_device", precision, False)


def test_workers_and_the_chief():
    assert d.worker_index("") is None and d.is_chief("")
    assert d.worker_index(CLUSTER) == 0 and d.is_chief(CLUSTER)
    second = json.dumps({"cluster": {"worker": ["a:1", "b:2"]},
                         "task": {"type": "worker", "index": 1}})
    assert d.worker_index(second) == 1 and not d.is_chief(second)
    with_chief = json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:2"]},
                             "task": {"type": "worker", "index": 0}})
    assert d.worker_index(with_chief) == 1 and not d.is_chief(with_chief)
    assert d.run_folder("r", "m", "k", second) == Path("r/.backup/m/k/worker-1")
    assert d.run_folder("r", "m", "k", "") == Path("r/.backup/m/k")


def test_an_emulated_precision_is_kept_with_a_warning_line():
    assert d.slow_precision("float32", gpus=0, bf16_cpu=False) is None
    assert d.slow_precision("mixed_bfloat16", gpus=0, bf16_cpu=True) is None
    assert d.slow_precision("mixed_float16", gpus=1, bf16_cpu=False) is None
    for precision, bf16 in (("mixed_bfloat16", False), ("mixed_float16", True)):
        line = d.slow_precision(precision, gpus=0, bf16_cpu=bf16)
        assert line.startswith(f"training.precision = {precision}: ") and "emulated" in line
        assert "precision: auto" in line


@pytest.mark.parametrize(("progress", "agreed"), [
    ([2, 2], 2),  # in step
    ([3, 2], 2),  # one worker killed before its last epoch's backup: the other steps back
    ([1, 0], 0),
    ([5, 5], 5),  # every worker finished the stage (4 epochs: 5)
    ([5, 4], 0),  # one finished, its epochs gone: nobody can step back, the stage restarts
    ([3, 1], 0),
])
def test_the_workers_of_a_cluster_resume_a_stage_at_one_point(progress, agreed):
    assert d.cluster_resume(progress, epochs=4) == agreed


def test_a_worker_ahead_steps_back_to_its_previous_checkpoint(tmp_path):
    folder = tmp_path / "epochs"
    folder.mkdir()
    for name, epoch in (("training_metadata.json", 3), ("training_metadata.json.bkp", 2)):
        (folder / name).write_text(json.dumps({"epoch": epoch, "batch": 0}))
    (folder / "latest.weights.h5").write_text("epoch 3")
    (folder / "latest.weights.h5.bkp").write_text("epoch 2")
    d.step_back(folder)
    assert d.resumed_epoch(folder) == 2
    assert (folder / "latest.weights.h5").read_text() == "epoch 2"
    with pytest.raises(RuntimeError, match="no previous checkpoint"):
        d.step_back(folder)  # only one previous epoch is kept
    (folder / "training_metadata.json").write_text(json.dumps({"epoch": 1, "batch": 0}))
    d.step_back(folder)  # back to no epoch at all
    assert not folder.exists() and d.resumed_epoch(folder) == 0
