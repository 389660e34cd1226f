"""Ingestion: a seeded subset of images per class (ingestion.max_images_per_class), and groups
(slides, patients) that hold images of several classes, which are allowed."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from _params import params
from PIL import Image

from neuroblastoma_cnn.pipelines.ingestion.nodes import build_image_manifest

SETTINGS = {"extensions": [".png", ".tif"], "min_image_size": 16, "tile_size": None,
            "stride": None, "min_tissue_fraction": 0.5, "input_size": 16, "workers": 1}


def save_tissue(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    rgb = np.clip(np.array((200, 110, 190)) + rng.integers(-15, 16, (32, 32, 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb.astype(np.uint8)).save(path)


def kather_like(root: Path, per_class: int = 6) -> Path:
    """Three class folders of `<n>_CRC-Prim-HE-<slide>_<k>.tif` files, slides across classes."""
    for c, label in enumerate(["01_TUMOR", "02_STROMA", "03_EMPTY"]):
        for k in range(per_class):
            save_tissue(root / label / f"{k}_CRC-Prim-HE-{k % 3 + 1:02d}_{k:03d}.tif",
                        seed=100 * c + k)
    return root


def test_subset_keeps_at_most_n_images_per_class_drawn_with_the_seed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = kather_like(tmp_path / "raw")
    with caplog.at_level(logging.INFO):
        manifest, rejected = build_image_manifest(
            root, params("ingestion", **SETTINGS, max_images_per_class=4, subset_seed=1))
    assert manifest.groupby("label").size().to_dict() == {
        "01_TUMOR": 4, "02_STROMA": 4, "03_EMPTY": 4}
    assert rejected.empty  # files not drawn are not "rejected": they were never read
    assert "using 12 of 18 image files" in caplog.text

    again, _ = build_image_manifest(
        root, params("ingestion", **SETTINGS, max_images_per_class=4, subset_seed=1))
    assert again["image_path"].tolist() == manifest["image_path"].tolist()
    draws = {tuple(build_image_manifest(root, params(
        "ingestion", **SETTINGS, max_images_per_class=4, subset_seed=s))[0]["image_path"])
        for s in range(2, 6)}
    assert len(draws) > 1  # another seed, another subset

    everything, _ = build_image_manifest(root, params("ingestion", **SETTINGS))
    assert len(everything) == 18  # base default: null = every image
    larger, _ = build_image_manifest(
        root, params("ingestion", **SETTINGS, max_images_per_class=50))
    assert len(larger) == 18


def test_slide_groups_span_class_folders(tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    root = kather_like(tmp_path / "raw")
    settings = params("ingestion", **SETTINGS,
                      group_pattern=r"(?P<group>CRC-Prim-HE-\d\d[A-Za-z]?)")
    with caplog.at_level(logging.INFO):
        manifest, rejected = build_image_manifest(root, settings)
    assert rejected.empty
    assert len(manifest) == 18
    assert manifest.groupby("group")["label"].nunique().to_dict() == {
        "CRC-Prim-HE-01": 3, "CRC-Prim-HE-02": 3, "CRC-Prim-HE-03": 3}
    assert manifest.groupby("image_path")["label"].nunique().eq(1).all()  # one label an image
    assert "3 of 3 groups hold images of several classes" in caplog.text


def test_same_patient_folder_under_two_classes_is_one_group(tmp_path: Path) -> None:
    save_tissue(tmp_path / "raw" / "GradeA" / "P07" / "a.png", 1)
    save_tissue(tmp_path / "raw" / "GradeB" / "P07" / "b.png", 2)
    save_tissue(tmp_path / "raw" / "GradeB" / "P08" / "c.png", 3)
    manifest, rejected = build_image_manifest(tmp_path / "raw", params("ingestion", **SETTINGS))
    assert rejected.empty
    assert manifest.set_index("image_path")["group"].to_dict() == {
        "GradeA/P07/a.png": "P07", "GradeB/P07/b.png": "P07", "GradeB/P08/c.png": "P08"}
