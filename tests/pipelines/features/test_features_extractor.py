"""The extractor side: feature tables from a real (small, random-weight) network, and extractor +
head as prediction applies them, which must equal the evaluation path on the same tiles."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from _params import store_metadata
from kedro.io.core import Version
from kedro_datasets.pandas import ParquetDataset

from neuroblastoma_cnn.core.errors import DataError, ModelError
from neuroblastoma_cnn.datasets.sklearn_heads import SklearnHeadsDataset, find_head, head_classifier
from neuroblastoma_cnn.datasets.tile_store import TileStore, write_tile_store
from neuroblastoma_cnn.images.preprocessing import Preprocessing, attach_preprocessing
from neuroblastoma_cnn.models.families import build_model
from neuroblastoma_cnn.models.feature_heads import (
    HeadClassifier,
    extractor_identity,
    head_probabilities,
)
from neuroblastoma_cnn.params import base_group
from neuroblastoma_cnn.pipelines.features import nodes as n

CLASSES = ["a", "b", "c"]
SIZE = 32


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[TileStore, pd.DataFrame]:
    """48 random tiles: 3 classes x 4 groups x 2 images x 2 tiles; per class groups 0-1 train,
    2 validation, 3 test; folds by group."""
    rng = np.random.default_rng(0)
    rows = []
    for c, label in enumerate(CLASSES):
        for g in range(4):
            for image in range(2):
                for _ in range(2):
                    rows.append({"image_path": f"{label}/{label}{g}/{image}.png", "label": label,
                                 "group": f"{label}{g}", "split": ["train", "train",
                                                                 "validation", "test"][g],
                                 "fold": -1 if g == 3 else (g + c) % 2})

    def records() -> Any:
        for row in rows:
            tile = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            yield tile, {k: row[k] for k in ("image_path", "label", "group")}

    folder = tmp_path_factory.mktemp("features") / "tiles" / "2026-01-01T00.00.00.000Z" / "tiles"
    tiles = write_tile_store(folder, records(), metadata=store_metadata(CLASSES, SIZE))
    split = tiles.index[["tile_id", "image_path", "label", "group"]].copy()
    split["split"] = [r["split"] for r in rows]
    split["fold"] = [r["fold"] for r in rows]
    return tiles, split


def trained_like(tiles: TileStore, architecture: str, seed: int) -> Any:
    """A network as training leaves it: random weights, with its preprocessing record."""
    extra = {"weights": None} if architecture == "resnet50" else {}
    model = build_model(architecture, input_size=SIZE, num_classes=len(CLASSES), seed=seed,
                        **extra)
    record = Preprocessing.from_store(tiles).model_copy(update={"architecture": architecture})
    attach_preprocessing(model, record, where=f"test {architecture}")
    model.model_source = f"data/06_models/{architecture}/model.keras/v{seed}/model.keras"
    return model


def heads_params() -> dict[str, Any]:
    p = copy.deepcopy(base_group("features.heads"))
    p["classifiers"] = {"logreg": {**p["classifiers"]["logreg"], "grid": {"C": [0.1]}},
                        "svm": {**p["classifiers"]["svm"],
                                "grid": {"C": [1.0], "gamma": ["scale"]}}}
    return p


def extraction(**changes: Any) -> dict[str, Any]:
    return {**base_group("features.extraction"), "batch_size": 8, **changes}


@pytest.mark.parametrize(("architecture", "dim"), [("resnet34", 512), ("resnet50", 2048)])
def test_feature_table_holds_pooled_features_softmax_and_identity(store, architecture, dim):
    tiles, split = store
    model = trained_like(tiles, architecture, seed=1)
    table = n.extract_feature_table(model, tiles, split, extraction())
    assert len(table) == len(split)
    assert list(table["tile_id"]) == list(split["tile_id"])
    assert n.feature_columns(table) == [f"f{i}" for i in range(dim)]
    identity = n.table_identity(table)
    assert identity["architecture"] == architecture
    assert identity["feature_dim"] == dim
    assert identity["classes"] == CLASSES
    assert identity["tiles_version"] == "2026-01-01T00.00.00.000Z"
    # The softmax columns are the network's own output on those tiles.
    expected = model.predict(tiles.get(split["tile_id"]).astype("float32"), verbose=0)
    cnn = table[[f"cnn_prob_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(cnn, expected, atol=1e-5)
    # Streaming from the shards (memory limit below the subset) gives the same features.
    streamed = n.extract_feature_table(model, tiles, split, extraction(in_memory_limit_mb=0.01))
    np.testing.assert_allclose(streamed[n.feature_columns(table)].to_numpy(),
                               table[n.feature_columns(table)].to_numpy(), atol=1e-5)


def test_feature_table_keeps_its_identity_through_the_catalog(store, tmp_path):
    tiles, split = store
    table = n.extract_feature_table(trained_like(tiles, "resnet34", 1), tiles, split,
                                    extraction())
    dataset = ParquetDataset(filepath=str(tmp_path / "features.parquet"),
                             version=Version(None, None))
    dataset.save(table)
    loaded = ParquetDataset(filepath=str(tmp_path / "features.parquet"),
                            version=Version(None, None)).load()
    assert n.table_identity(loaded) == n.table_identity(table)
    pd.testing.assert_frame_equal(loaded, table)


def test_tiles_of_another_ingestion_run_are_refused(store):
    tiles, split = store
    other = split.copy()
    other.loc[3, "label"] = "b" if other.loc[3, "label"] != "b" else "a"
    with pytest.raises(DataError, match="different ingestion runs"):
        n.extract_feature_table(trained_like(tiles, "resnet34", 1), tiles, other, extraction())


def test_extractor_plus_head_equals_the_evaluation_path(store):
    tiles, split = store
    model = trained_like(tiles, "resnet34", seed=2)
    table = n.extract_feature_table(model, tiles, split, extraction())
    bundles, _ = n.fit_heads(table, split, heads_params())
    test_ids = split.loc[split["split"] == "test", "tile_id"].tolist()
    evaluated = n.predict_tile_probabilities(table, bundles, "test")
    classifier = HeadClassifier(model, bundles["svm"])
    assert classifier.output_shape == (None, 3)
    assert tuple(classifier.input_shape) == (None, SIZE, SIZE, 3)
    # Prediction feeds batches of another size than extraction did.
    batches = np.array_split(tiles.get(test_ids).astype("float32"), 3)
    prob = np.concatenate([classifier.predict_on_batch(b) for b in batches])
    expected = evaluated[evaluated["predictor"] == "svm"][[f"prob_{c}" for c in CLASSES]]
    np.testing.assert_allclose(prob, expected.to_numpy(), atol=1e-5)
    features = table.set_index("tile_id").loc[test_ids, n.feature_columns(table)].to_numpy()
    np.testing.assert_allclose(classifier.features(tiles.get(test_ids).astype("float32")),
                               features, atol=1e-4)
    np.testing.assert_allclose(head_probabilities(bundles["svm"]["model"], features, 3),
                               expected.to_numpy(), atol=1e-9)


def test_a_head_is_refused_on_another_model(store, tmp_path: Path):
    tiles, split = store
    model = trained_like(tiles, "resnet34", seed=2)
    retrained = trained_like(tiles, "resnet34", seed=3)  # same record, other weights
    models_dir = tmp_path / "06_models"
    with pytest.raises(ModelError) as caught:
        find_head(models_dir, model, "svm")
    assert "kedro run --pipeline=resnet34_features" in caught.value.one_line()

    table = n.extract_feature_table(model, tiles, split, extraction())
    bundles, _ = n.fit_heads(table, split, heads_params())
    SklearnHeadsDataset(str(models_dir / "resnet34/heads.pkl"),
                        version=Version(None, "2026-01-01T00.00.00.000Z")).save(bundles)

    assert isinstance(head_classifier(models_dir, model, "svm"), HeadClassifier)
    with pytest.raises(ModelError, match=r"saved heads: logreg, svm"):
        find_head(models_dir, model, "tree")
    with pytest.raises(ModelError) as caught:
        head_classifier(models_dir, retrained, "svm")
    text = caught.value.one_line()
    assert "none was fitted on the features of model" in text
    assert "weights" in text
    assert "kedro run --pipeline=resnet34_features" in text
    with pytest.raises(ModelError, match="weights"):
        HeadClassifier(retrained, bundles["svm"])

    # Heads of the retrained model saved later: each model finds its own.
    table2 = n.extract_feature_table(retrained, tiles, split, extraction())
    later, _ = n.fit_heads(table2, split, heads_params())
    SklearnHeadsDataset(str(models_dir / "resnet34/heads.pkl"),
                        version=Version(None, "2026-01-02T00.00.00.000Z")).save(later)
    _, path = find_head(models_dir, model, "svm")
    assert "2026-01-01" in str(path)
    _, path = find_head(models_dir, retrained, "svm")
    assert "2026-01-02" in str(path)
    assert extractor_identity(retrained, 512)["weights_sha256"] != (
        extractor_identity(model, 512)["weights_sha256"])


def test_untrained_extractor_is_built_from_the_tile_record(store):
    tiles, _ = store
    params = {**base_group("features.extractors.resnet50"), "source": "untrained",
              "weights": None}
    model = n.select_extractor(None, tiles, params)
    assert model.preprocessing.architecture == "resnet50"
    assert list(model.preprocessing.classes) == CLASSES
    again = n.select_extractor(None, tiles, params)
    assert extractor_identity(model, 2048) == extractor_identity(again, 2048)  # seeded
    with pytest.raises(ModelError, match="only resnet50 takes"):
        n.select_extractor(None, tiles, {**base_group("features.extractors.resnet34"),
                                         "source": "untrained", "weights": "imagenet"})
