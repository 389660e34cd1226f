"""Distribution rules (strategy, precision, XLA) and the float32 model saved after mixed
precision: decided without a GPU, carried out on CPU."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from neuroblastoma_cnn import distribution as d
from neuroblastoma_cnn.errors import ParameterError

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
