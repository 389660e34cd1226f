"""The classical baseline runs on a user's raw folder, splits by patient like the project and
beats chance on images that differ by colour."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neuroblastoma_cnn.params import base_parameters

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import baseline_classical as bc


def write_folder(root: Path, patients: int = 5, images: int = 3, seed: int = 0) -> Path:
    """Two classes of stained-looking noise: pink (eosin-rich) and purple (haematoxylin-rich)."""
    rng = np.random.default_rng(seed)
    colours = {"Pink": (225, 120, 170), "Purple": (120, 80, 170)}
    for label, colour in colours.items():
        for p in range(patients):
            folder = root / label / f"{label}-{p}"
            folder.mkdir(parents=True)
            for i in range(images):
                noise = rng.normal(0, 25, (96, 96, 3))
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def parameters() -> dict:
    return base_parameters()


def test_baseline_beats_chance_on_colour_separable_images(tmp_path, parameters):
    root = write_folder(tmp_path / "raw")
    result = bc.run(root, parameters, downscale=2, n_boot=100, out=tmp_path / "out")
    assert result["f1_macro"] > 0.9  # chance is 0.5 for two classes
    assert result["f1_macro_ci95"][0] <= result["f1_macro"] <= result["f1_macro_ci95"][1]
    assert result["images"]["test"] > 0 and sum(result["images"].values()) == 30
    predictions = (tmp_path / "out" / "baseline_test_predictions.csv").read_text()
    assert "predicted" in predictions.splitlines()[0]


def test_split_is_the_projects_patient_split(tmp_path, parameters):
    root = write_folder(tmp_path / "raw", patients=6)
    table = bc.image_split(root, parameters)
    assert table.groupby("group")["split"].nunique().max() == 1  # patients never straddle
    assert set(table["split"]) == {"train", "validation", "test"}
    # same seed, same data: the same split again
    again = bc.image_split(root, parameters)
    assert table.equals(again)

