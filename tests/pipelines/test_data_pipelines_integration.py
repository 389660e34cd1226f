"""Ingestion -> splitting -> augmentation through Kedro on real tissue (tiny environment).

Checks what only a real run shows: versioned artifacts pile up instead of being replaced, an
earlier `tiles` version can be chosen with `load_versions`, the saved split has no patient in
two splits, and augmentation gives the same bytes when run twice.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from neuroblastoma_cnn.datasets import TileStore

pytestmark = pytest.mark.integration

TARGET = 12  # augmentation.target_per_class in conf/tiny


def versions(path: Path) -> list[Path]:
    """Every version of a versioned artifact, oldest first: <path>/<version>/<name>."""
    return [v / path.name for v in sorted(p for p in path.iterdir() if p.is_dir())]


def test_ingest_split_augment_with_versions(kedro_project: Path, run_kedro) -> None:
    data = kedro_project / "data"
    run_kedro("ingestion")
    # A second ingestion with overlapping tiles: more tiles, a second version beside the first.
    run_kedro("ingestion", runtime_params={"ingestion": {"stride": 64}})
    tile_versions = versions(data / "03_primary" / "tiles")
    assert len(tile_versions) == 2
    first, second = (TileStore(p) for p in tile_versions)
    assert len(second) > len(first)
    first_version = tile_versions[0].parent.name

    run_kedro("splitting", load_versions={"tiles": first_version})
    (split_path,) = versions(data / "05_model_input" / "split_table.csv")
    split = pd.read_csv(split_path, dtype={"group": str, "label": str})
    assert split["tile_id"].tolist() == first.index["tile_id"].tolist()  # the first version
    assert (split["image_path"] == first.index["image_path"]).all()
    assert (split.groupby("group")["split"].nunique() == 1).all(), "a patient is in two splits"
    # 3 patients per class in the subset: one patient per class in each split.
    per_class = split.groupby(["label", "split"])["group"].nunique().unstack()
    assert (per_class[["train", "validation", "test"]] == 1).all().all()
    (summary_path,) = versions(data / "08_reporting" / "split_summary.csv")
    assert pd.read_csv(summary_path)["tiles"].sum() == len(first)

    # The latest tiles no longer match the split: augmentation refuses instead of mislabelling.
    with pytest.raises(Exception, match=r"different versions of tiles|load-versions"):
        run_kedro("augmentation")
    assert not (data / "05_model_input" / "augmented_train_tiles").exists()

    for _ in range(2):
        run_kedro("augmentation", load_versions={"tiles": first_version})
    aug_versions = versions(data / "05_model_input" / "augmented_train_tiles")
    assert len(aug_versions) == 2
    assert len(versions(data / "08_reporting" / "augmentation_grid.png")) == 2
    a, b = aug_versions
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and "index.csv" in files
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs between runs"

    augmented = TileStore(a)
    counts = augmented.index["label"].value_counts()
    assert counts.to_dict() == dict.fromkeys(first.metadata["classes"], TARGET)
    train_ids = set(split.loc[split["split"] == "train", "tile_id"])
    assert set(augmented.index["source_tile_id"]) <= train_ids
    originals = augmented.index[~augmented.index["augmented"]]
    assert set(originals["source_tile_id"]) == train_ids
    assert augmented.tile_shape == first.tile_shape
