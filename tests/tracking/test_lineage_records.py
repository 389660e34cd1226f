"""Lineage records and the check that a node's inputs come from one lineage."""

from __future__ import annotations

import pandas as pd
import pytest
from kedro.io.core import Version
from kedro_datasets.pandas import CSVDataset

from neuroblastoma_cnn.core.errors import DataError
from neuroblastoma_cnn.tracking import lineage

OLD, NEW = "2026-01-01T00.00.00.000Z", "2026-02-01T00.00.00.000Z"


def test_inputs_made_from_other_versions_stop_with_one_line():
    versions = {"tiles": NEW, "split_table": OLD, "augmented_train_tiles": OLD}
    records = {"tiles": {"made_from": {"image_manifest": NEW}},
               "split_table": {"made_from": {"tiles": OLD, "image_manifest": OLD}},
               "augmented_train_tiles": {"made_from": {"tiles": OLD, "split_table": OLD}}}
    with pytest.raises(DataError) as caught:
        lineage.check_same_lineage(versions, records, where="node resnet34.train_model")
    line = caught.value.one_line()
    assert line == (
        "The inputs of node resnet34.train_model come from different versions of tiles: it "
        f"loads tiles {NEW}, but augmented_train_tiles and split_table were made from tiles "
        f"{OLD} (rerun `kedro run --pipeline=data_processing` to remake them together, or pin "
        "matching versions with --load-versions)")


def test_one_lineage_or_no_record_passes():
    lineage.check_same_lineage(
        {"tiles": OLD, "split_table": OLD},
        {"tiles": None, "split_table": {"made_from": {"tiles": OLD}}}, where="x")
    lineage.check_same_lineage({"tiles": NEW, "split_table": OLD},
                               {"tiles": None, "split_table": None}, where="x")  # made before


def test_ancestors_disagreeing_without_the_dataset_loaded_also_stop():
    with pytest.raises(DataError, match="different versions of image_manifest"):
        lineage.check_same_lineage(
            {"split_table": OLD, "tiles": NEW},
            {"split_table": {"made_from": {"image_manifest": OLD}},
             "tiles": {"made_from": {"image_manifest": NEW}}}, where="x")


def test_made_from_collects_inputs_and_their_ancestors():
    assert lineage.made_from({"tiles": NEW, "split_table": NEW},
                             {"tiles": {"made_from": {"image_manifest": NEW}},
                              "split_table": None}) == {
        "image_manifest": NEW, "split_table": NEW, "tiles": NEW}


def test_records_live_in_the_version_folder_and_are_never_replaced(tmp_path):
    dataset = CSVDataset(filepath=str(tmp_path / "split_table.csv"), version=Version(None, NEW))
    folder = lineage.version_folder(dataset, NEW)
    assert folder == tmp_path / "split_table.csv" / NEW
    lineage.write_lineage(folder, {"made_from": {"tiles": OLD}})
    assert lineage.read_lineage(folder) == {"made_from": {"tiles": OLD}}
    with pytest.raises(FileExistsError):
        lineage.write_lineage(folder, {"made_from": {}})
    # Kedro's version lookup ignores it: the only version is still NEW, once the CSV exists.
    dataset.save(pd.DataFrame({"a": [1]}))
    assert lineage.load_version(CSVDataset(filepath=str(tmp_path / "split_table.csv"),
                                           version=Version(None, None))) == NEW
    assert lineage.version_folder(CSVDataset(filepath=str(tmp_path / "x.csv")), NEW) is None
