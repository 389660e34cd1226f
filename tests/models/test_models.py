"""Models: ResNet34 architecture, ResNet50 weights loading, fine-tuning, the feature cache."""

from __future__ import annotations

from collections.abc import Callable

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

from neuroblastoma_cnn.models.families import build_model
from neuroblastoma_cnn.models.resnet34 import build_resnet34
from neuroblastoma_cnn.models.resnet50 import (
    IMAGENET_FILE,
    WeightsUnavailableError,
    backbone_and_head,
    build_resnet50,
    cache_features,
    set_trainable_top_blocks,
)

# Parameters of torchvision's resnet34 (He et al. 2016 Table 1: "21.8M"); BN running stats are
# buffers there, non-trainable weights here, so the trainable count must match exactly.
RESNET34_PARAMS = 21_797_672


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _layers_of(model: keras.Model, kind: type) -> list[keras.layers.Layer]:
    return [layer for layer in model.layers if isinstance(layer, kind)]


def _backbone_weights(model: keras.Model) -> list[np.ndarray]:
    return model.get_layer("resnet50").get_weights()


# ------------------------------------------------------------------------------------ ResNet34


def test_resnet34_matches_the_published_architecture() -> None:
    model = build_resnet34(224, 1000)
    convs = _layers_of(model, keras.layers.Conv2D)
    projections = [c.name for c in convs if c.name.endswith("_proj_conv")]
    assert model.name == "resnet34"
    assert len(convs) == 36  # stem + 2 * (3 + 4 + 6 + 3) block convs + 3 projections
    assert projections == ["conv3_block1_proj_conv", "conv4_block1_proj_conv",
                           "conv5_block1_proj_conv"]
    assert len(_layers_of(model, keras.layers.BatchNormalization)) == 36
    assert model.get_layer("conv1_conv").kernel.shape == (7, 7, 3, 64)
    assert model.get_layer("conv1_conv").strides == (2, 2)
    assert model.get_layer("conv5_block3_conv2").kernel.shape == (3, 3, 512, 512)
    assert model.get_layer("conv5_block3_out").output.shape == (None, 7, 7, 512)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == RESNET34_PARAMS
    assert abs(trainable - 21.8e6) / 21.8e6 < 0.01
    assert model.output_shape == (None, 1000)


def test_resnet34_takes_raw_tiles_and_is_reproducible() -> None:
    a = build_resnet34(64, 3, seed=7)
    b = build_resnet34(64, 3, seed=7)
    c = build_resnet34(64, 3, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights(), strict=True))
    assert not np.array_equal(a.get_layer("conv1_conv").kernel, c.get_layer("conv1_conv").kernel)
    # Different layers get different initial values (one seed per layer, not one for all).
    assert not np.array_equal(a.get_layer("conv2_block1_conv1").kernel,
                              a.get_layer("conv2_block1_conv2").kernel)
    assert a.get_layer("rescale").scale == pytest.approx(1 / 255)
    tiles = _images(2, 64)
    prob = a.predict(tiles, verbose=0)
    assert prob.shape == (2, 3)
    np.testing.assert_allclose(prob.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(prob, a.predict(tiles.astype(np.float32), verbose=0), rtol=1e-6)


def test_resnet34_dropout_and_regularisers_only_when_asked() -> None:
    plain = build_resnet34(32, 2)
    assert plain.get_layer("dropout").rate == 0.0
    assert plain.losses == []
    model = build_resnet34(32, 2, dropout=0.3, l1=1e-5, l2=1e-4)
    assert model.get_layer("dropout").rate == 0.3
    kernels = _layers_of(model, keras.layers.Conv2D) + _layers_of(model, keras.layers.Dense)
    for layer in kernels:
        reg = layer.kernel_regularizer
        assert isinstance(reg, keras.regularizers.L1L2), layer.name
        assert (reg.l1, reg.l2) == pytest.approx((1e-5, 1e-4))
    assert len(model.losses) == len(kernels) == 37


def test_resnet34_batch_norm_momentum_reaches_every_batch_norm_layer() -> None:
    norms = _layers_of(build_resnet34(32, 2, batch_norm_momentum=0.9),
                       keras.layers.BatchNormalization)
    assert len(norms) == 37 - 1 and {layer.momentum for layer in norms} == {0.9}
    assert {layer.momentum for layer in _layers_of(build_resnet34(32, 2),
                                                   keras.layers.BatchNormalization)} == {0.99}
    with pytest.raises(ValueError, match="batch_norm_momentum must be in"):
        build_resnet34(32, 2, batch_norm_momentum=1.0)


def test_build_model_dispatches_and_reports_bad_names() -> None:
    assert build_model("ResNet34", 32, 4).name == "resnet34"
    with pytest.raises(ValueError, match=r"Unknown architecture 'vgg16'.*resnet34, resnet50"):
        build_model("vgg16", 32, 4)
    with pytest.raises(ValueError, match=r"Unknown parameter\(s\) \['depth'\].*dropout"):
        build_model("resnet34", 32, 4, depth=18)


# ------------------------------------------------------------------------------------ ResNet50


@pytest.fixture(scope="module")
def resnet50_source() -> keras.Model:
    """A randomly initialised model whose backbone weights the loading tests look for."""
    return build_resnet50(32, 3, weights=None, seed=1)


def test_resnet50_layout_frozen_backbone_and_preprocessing(resnet50_source: keras.Model) -> None:
    model = resnet50_source
    assert model.output_shape == (None, 3)
    assert [w.path for w in model.trainable_weights] == ["head_dense/kernel", "head_dense/bias"]
    assert {"head_pool", "head_dropout", "head_dense"} <= {layer.name for layer in model.layers}
    raw = _images(4, 32).astype(np.float32)
    inside = model.get_layer("imagenet_preprocess")(raw)
    expected = keras.applications.resnet50.preprocess_input(raw.copy())
    np.testing.assert_allclose(np.asarray(inside), expected, atol=1e-4)
    # Dropout 0 and BatchNorm in inference mode: training=True gives the same output.
    np.testing.assert_allclose(model(raw, training=True), model(raw, training=False), atol=1e-6)


def _write_legacy_h5(backbone: keras.Model, path: str) -> None:
    """Writes weights the way the ImageNet ``*_notop.h5`` file stores them (legacy h5 format)."""
    with h5py.File(path, "w") as f:
        save_weights_to_hdf5_group(f, backbone)


@pytest.mark.parametrize("kind", ["weights.h5", "legacy.h5", "backbone.keras", "model.keras"])
def test_resnet50_loads_local_weights(resnet50_source: keras.Model, tmp_path, kind: str) -> None:
    backbone = resnet50_source.get_layer("resnet50")
    path = tmp_path / f"resnet50.{kind}"
    if kind == "weights.h5":
        backbone.save_weights(path)
    elif kind == "legacy.h5":
        _write_legacy_h5(backbone, str(path))
    elif kind == "backbone.keras":
        backbone.save(path)
    else:
        resnet50_source.save(path)
    # A different input size: convolution weights do not depend on it.
    loaded = build_resnet50(64, 3, weights=str(path), seed=2)
    expected = _backbone_weights(resnet50_source)
    got = _backbone_weights(loaded)
    assert len(got) == len(expected)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    assert not loaded.get_layer("resnet50").trainable


def test_resnet50_random_init_is_reproducible_given_seed(resnet50_source) -> None:
    again = build_resnet50(32, 3, weights=None, seed=1)
    other = build_resnet50(32, 3, weights=None, seed=2)
    pairs = zip(again.get_weights(), resnet50_source.get_weights(), strict=True)
    assert all(np.array_equal(a, b) for a, b in pairs)
    kernel = "conv1_conv"
    assert not np.array_equal(other.get_layer("resnet50").get_layer(kernel).kernel,
                              again.get_layer("resnet50").get_layer(kernel).kernel)


def test_resnet50_missing_or_wrong_weights_file(tmp_path) -> None:
    missing = tmp_path / "nowhere" / IMAGENET_FILE
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_resnet50(32, 2, weights=str(missing))
    other = tmp_path / "resnet34.keras"
    build_resnet34(32, 2).save(other)
    with pytest.raises(ValueError, match=r"resnet34\.keras.*not an include_top=False ResNet50"):
        build_resnet50(32, 2, weights=str(other))


def test_resnet50_download_failure_explains_the_offline_fix(monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- "
                        "[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(WeightsUnavailableError) as caught:
        build_resnet50(32, 2, weights="imagenet")
    message = str(caught.value)
    assert "Could not download" in message
    assert "name resolution" in message
    assert f"weights: /path/to/{IMAGENET_FILE}" in message
    assert f".keras/models/{IMAGENET_FILE}" in message


def test_resnet50_imagenet_uses_the_cached_file(monkeypatch, tmp_path, resnet50_source) -> None:
    cached = tmp_path / IMAGENET_FILE
    _write_legacy_h5(resnet50_source.get_layer("resnet50"), str(cached))
    monkeypatch.setattr(keras.utils, "get_file", lambda *args, **kwargs: str(cached))
    model = build_resnet50(32, 3, weights="imagenet")
    assert all(np.array_equal(a, b) for a, b in zip(
        _backbone_weights(model), _backbone_weights(resnet50_source), strict=True))


def test_set_trainable_top_blocks_unfreezes_convs_keeps_batchnorm_frozen() -> None:
    model = build_resnet50(32, 3, dropout=0.0, l2=1e-4, weights=None, seed=0)
    assert len(model.losses) == 1  # frozen backbone: only the head kernel is penalised
    assert set_trainable_top_blocks(model, 1) == [
        "conv5_block3_1_conv", "conv5_block3_2_conv", "conv5_block3_3_conv"]
    unfrozen = set_trainable_top_blocks(model, 3)
    assert len(unfrozen) == 10 and "conv5_block1_0_conv" in unfrozen
    assert not any(name.startswith("conv4") for name in unfrozen)
    backbone = model.get_layer("resnet50")
    assert not any(layer.trainable for layer in backbone.layers
                   if isinstance(layer, keras.layers.BatchNormalization))
    trainable = {w.path.split("/")[0] for w in model.trainable_weights}
    assert trainable == {*unfrozen, "head_dense"}
    assert len(model.losses) == 1 + 10  # the unfrozen kernels are now penalised too

    # One training step: unfrozen kernels move, BatchNorm statistics and frozen layers do not.
    bn = backbone.get_layer("conv5_block3_1_bn")
    before = {name: backbone.get_layer(name).get_weights()[0].copy()
              for name in ("conv5_block3_1_conv", "conv4_block6_1_conv")}
    bn_before = [w.copy() for w in bn.get_weights()]
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    model.fit(_images(8, 32), np.arange(8) % 3, batch_size=8, epochs=1, verbose=0)
    assert not np.array_equal(backbone.get_layer("conv5_block3_1_conv").get_weights()[0],
                              before["conv5_block3_1_conv"])
    assert np.array_equal(backbone.get_layer("conv4_block6_1_conv").get_weights()[0],
                          before["conv4_block6_1_conv"])
    assert all(np.array_equal(a, b) for a, b in zip(bn.get_weights(), bn_before, strict=True))

    assert set_trainable_top_blocks(model, 0) == []
    assert [w.path for w in model.trainable_weights] == ["head_dense/kernel", "head_dense/bias"]
    with pytest.raises(ValueError, match="between 0 and 16"):
        set_trainable_top_blocks(model, 17)


def test_backbone_and_head_share_weights_with_the_model(resnet50_source) -> None:
    backbone, head = backbone_and_head(resnet50_source)
    tiles = _images(3, 32)
    features = backbone.predict(tiles, verbose=0)
    assert features.shape == (3, 2048)
    np.testing.assert_allclose(head.predict(features, verbose=0),
                               resnet50_source.predict(tiles, verbose=0), atol=1e-6)
    assert head.get_layer("head_dense") is resnet50_source.get_layer("head_dense")
    with pytest.raises(ValueError, match="not built by build_resnet50"):
        backbone_and_head(build_resnet34(32, 2))


# ------------------------------------------------------------------------------ feature cache

N_IMAGES, SIZE, EPOCHS, BATCH = 20, 32, 3, 8


@pytest.fixture(scope="module")
def cache_data() -> tuple[np.ndarray, np.ndarray]:
    return _images(N_IMAGES, SIZE, seed=3), np.random.default_rng(4).integers(0, 3, N_IMAGES)


@pytest.fixture(scope="module")
def fresh_model() -> Callable[[], keras.Model]:
    """Returns the same seeded model reset to its initial weights (building one takes ~1 s)."""
    model = build_resnet50(SIZE, 3, weights=None, seed=5)
    initial = model.get_weights()

    def reset() -> keras.Model:
        model.set_weights(initial)
        return model

    return reset


def _head_weights(model: keras.Model) -> list[np.ndarray]:
    return model.get_layer("head_dense").get_weights()


def _fit_cached(model: keras.Model, x, y, x_val=None, y_val=None, **kwargs):
    """Stage 1 as training runs it: ``cache_features``, then the head fitted on the cache."""
    cached = cache_features(model, x, y, x_val, y_val, batch_size=BATCH, **kwargs)
    cached.head.compile(optimizer=keras.optimizers.Adam(1e-3),
                        loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    validation = None if x_val is None else (cached.val_features, cached.val_labels)
    return cached.head.fit(cached.train, validation_data=validation, epochs=EPOCHS,
                           shuffle=False, verbose=0)


@pytest.mark.slow
def test_feature_cache_matches_the_naive_frozen_fit(cache_data, fresh_model) -> None:
    x, y = cache_data
    naive = fresh_model()
    start = _head_weights(naive)
    naive.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    naive_history = naive.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    naive_weights = _head_weights(naive)
    naive_prob = naive.predict(x, verbose=0)

    cached = fresh_model()
    assert all(np.array_equal(a, b) for a, b in zip(_head_weights(cached), start, strict=True))
    history = _fit_cached(cached, x, y, x[:6], y[:6], shuffle=False)

    np.testing.assert_allclose(history.history["loss"], naive_history.history["loss"], rtol=1e-5)
    for got, expected, initial in zip(_head_weights(cached), naive_weights, start, strict=True):
        assert not np.allclose(expected, initial)  # training did move the head
        np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_allclose(cached.predict(x, verbose=0), naive_prob, atol=1e-4)
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}


@pytest.mark.slow
def test_feature_cache_accepts_datasets_and_shuffles_by_seed(cache_data, fresh_model) -> None:
    x, y = cache_data
    model = fresh_model()
    _fit_cached(model, x, y, shuffle=False)
    from_arrays = _head_weights(model)
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    val = tf.data.Dataset.from_tensor_slices((x[:4], y[:4])).batch(2)
    history = _fit_cached(fresh_model(), train, None, val, None, shuffle=False)
    assert len(history.history["val_loss"]) == EPOCHS
    for a, b in zip(from_arrays, _head_weights(model), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)

    runs = []
    for seed in (11, 11, 12):
        _fit_cached(fresh_model(), x, y, seed=seed)
        runs.append(_head_weights(model)[0])
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.allclose(runs[0], runs[2])  # another seed, another order
    assert not np.allclose(runs[0], from_arrays[0])  # shuffling did reorder


def test_feature_cache_refuses_an_unfrozen_backbone_and_bad_inputs(cache_data) -> None:
    x, y = cache_data
    model = build_resnet50(SIZE, 3, weights=None)
    with pytest.raises(ValueError, match="same length"):
        _fit_cached(model, x, y[:-1])
    set_trainable_top_blocks(model, 1)
    with pytest.raises(ValueError, match="must be frozen"):
        _fit_cached(model, x, y)
