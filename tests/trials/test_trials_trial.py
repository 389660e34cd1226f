"""The Keras trial's pure helpers: diverged outputs, store views, per-repeat parameters."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from neuroblastoma_cnn.core.errors import ParameterError
from neuroblastoma_cnn.datasets import write_tile_store
from neuroblastoma_cnn.params import base_parameters
from neuroblastoma_cnn.trials.trial import (
    finite_predictions,
    parse_trial_params,
    subset_store,
)


def test_non_finite_outputs_count_as_the_first_class():
    tiles = pd.DataFrame({"tile_id": [0, 1, 2], "prob_A": [0.2, np.nan, 0.6],
                          "prob_B": [0.8, np.nan, np.inf], "predicted": ["B", "A", "A"],
                          "tta_prob_A": [0.1, 0.5, np.nan], "tta_prob_B": [0.9, 0.5, 0.1],
                          "tta_predicted": ["B", "A", "B"]})
    out, bad = finite_predictions(tiles)
    assert bad == 2
    assert out.loc[1, ["prob_A", "prob_B"]].tolist() == [0.5, 0.5]
    assert out["predicted"].tolist() == ["B", "A", "A"]
    assert out.loc[2, ["tta_prob_A", "tta_prob_B"]].tolist() == [0.5, 0.5]
    assert out["tta_predicted"].tolist() == ["B", "A", "A"]
    assert tiles.loc[1, "prob_A"] != tiles.loc[1, "prob_A"]  # the input is left as it was
    same, none = finite_predictions(out)
    assert none == 0 and same is out


def test_subset_store_is_a_view(tmp_path):
    records = [(np.full((4, 4, 3), i, np.uint8), {"label": "A", "group": f"g{i}"})
               for i in range(5)]
    store = write_tile_store(tmp_path / "store", records, shard_size=2)
    view = subset_store(store, [1, 3])
    assert view.index["tile_id"].tolist() == [1, 3] and len(store) == 5
    assert view.get([3])[0, 0, 0, 0] == 3


def test_each_repeat_trains_with_its_own_seed():
    block = base_parameters()["resnet34"]
    model, training = parse_trial_params(block, "resnet34", repeat=2)
    assert training.seed == block["training"]["seed"] + 2
    assert model.architecture == "resnet34"
    bad = {**block, "model": {**block["model"], "dropout": 1.5}}
    with pytest.raises(ParameterError, match=r"resnet34\.model\.dropout"):
        parse_trial_params(bad, "resnet34", repeat=0)
