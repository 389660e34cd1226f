"""The classical floor on the run's own split (``score_floor``) and its section of the model
card: fitted on the training images only, scored on the evaluated split with the patient
bootstrap, and a reason instead of a failure when it cannot be fitted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _params import params
from _synthetic_tissue import CLASSES, tissue
from PIL import Image

from neuroblastoma_cnn.analysis.model_card import _floor_section
from neuroblastoma_cnn.pipelines.evaluation.floor import score_floor


def _split(root: Path, train_groups: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for c, label in enumerate(CLASSES):
        for g in range(train_groups + 1):
            split = "test" if g == train_groups else "train"
            for i in range(3):
                path = Path(label) / f"c{c}g{g}_{i}.png"
                (root / label).mkdir(exist_ok=True)
                Image.fromarray(tissue(label, rng)).save(root / path)
                rows.append({"image_path": path.as_posix(), "label": label,
                             "group": f"c{c}g{g}", "split": split})
    return pd.DataFrame(rows)


def _params(**floor):
    cv = params("cross_validation")
    return cv.model_copy(update={"floor": cv.floor.model_copy(
        update={"downscale": 2, "inner_folds": 2, "c_grid": [1.0, 10.0],
                "gamma_factors": [0.1, 1.0], **floor})})


def test_floor_is_fitted_on_train_and_scored_on_the_evaluated_split(tmp_path):
    images = _split(tmp_path, train_groups=3)
    table = pd.concat([images] * 3).sort_index(kind="stable")  # a row per tile, 3 tiles an image
    out = score_floor(table, tmp_path, _params(), params("evaluation", bootstrap_samples=50))
    assert out["n_images"] == 9 and out["n_train_images"] == 27 and out["split"] == "test"
    assert out["f1_macro"] > 0.8  # the synthetic classes differ plainly in colour and texture
    assert out["macro_f1_ci"]["low"] <= out["f1_macro"] <= out["macro_f1_ci"]["high"]
    card = "\n".join(_floor_section(out, {"f1_macro": 0.5}))
    assert f"macro-F1 **{out['f1_macro']:.3f}**" in card
    assert f"{0.5 - out['f1_macro']:+.3f}" in card


def test_floor_reports_why_instead_of_failing(tmp_path):
    table = _split(tmp_path, train_groups=2)
    gone = tmp_path / table["image_path"][0]
    gone.unlink()  # a raw image removed since the split was made
    out = score_floor(table, tmp_path, _params(), params("evaluation"))
    assert gone.name in out["skipped"]
    assert "Not scored" in "\n".join(_floor_section(out, {}))
    assert score_floor(table, tmp_path, _params(enabled=False), params("evaluation")) == {
        "skipped": "cross_validation.floor.enabled is false"}
    assert _floor_section(None, {}) == []


@pytest.mark.parametrize("missing", ["train", "test"])
def test_floor_without_images_in_a_split(tmp_path, missing):
    table = _split(tmp_path, train_groups=2)
    out = score_floor(table[table["split"] != missing], tmp_path, _params(),
                      params("evaluation"))
    assert "no training or no evaluated images" in out["skipped"]
