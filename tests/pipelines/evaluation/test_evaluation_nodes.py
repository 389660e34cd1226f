"""Evaluation nodes that need no model: picking the worst mistakes for the gallery."""

from __future__ import annotations

import pandas as pd

from neuroblastoma_cnn.pipelines.evaluation.nodes import worst_misclassified


def test_worst_misclassified_picks_confident_mistakes_per_class():
    frame = pd.DataFrame({
        "image_path": ["a", "b", "c", "d", "e"],
        "label": ["X", "X", "X", "Y", "Y"],
        "predicted": ["Y", "Y", "X", "Y", "X"],
        "prob_X": [0.4, 0.1, 0.9, 0.2, 0.7],
        "prob_Y": [0.6, 0.9, 0.1, 0.8, 0.3],
    })
    worst = worst_misclassified(frame, per_class=1)
    assert list(worst["image_path"]) == ["b", "e"]
    assert list(worst["true_probability"]) == [0.1, 0.3]
    assert worst_misclassified(frame[frame["image_path"] == "c"], 3).empty
