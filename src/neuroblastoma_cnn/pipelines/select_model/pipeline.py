"""Model selection wiring: the selected floor on the folds, the ranking of every candidate
(the CNNs' fold predictions come from their ``cross_validate_<model>`` pipelines, which the
registry puts before this one), the winner's prediction sets."""

from __future__ import annotations

from collections.abc import Sequence

from kedro.pipeline import Node, Pipeline

from .nodes import (
    calibrate_prediction_sets,
    champion_card,
    prediction_set_report,
    refit_champion,
    register_champion,
    select_model,
    selected_floor_predictions,
)

TAGS = ["model", "select_model"]


def create_pipeline(cnn_models: Sequence[str] = (), **kwargs) -> Pipeline:
    """``cnn_models``: the CNN candidates whose ``<model>.cv_predictions`` the ranking reads."""
    inputs = {"cv_folds": "cv_folds", "cv_floor_predictions": "cv_floor_predictions",
              "selected_floor": "selected_floor_predictions", "params": "params:select_model",
              **{model: f"{model}_cv_predictions" for model in cnn_models}}
    nodes = Pipeline(
        [
            Node(selected_floor_predictions,
                 inputs=["cv_folds", "raw_images", "params:select_model"],
                 outputs="selected_floor_predictions", name="selected_floor_predictions"),
            Node(select_model, inputs=inputs,
                 outputs=["model_selection", "model_selection_report", "selection_predictions",
                          "model_selection_mlflow"], name="select_model"),
            Node(calibrate_prediction_sets,
                 inputs=["model_selection", "selection_predictions", "params:select_model"],
                 outputs="champion_calibration", name="calibrate_prediction_sets"),
            Node(refit_champion,
                 inputs={"model_selection": "model_selection",
                         "calibration": "champion_calibration",
                         "selection_predictions": "selection_predictions",
                         "cv_folds": "cv_folds",
                         "raw_images": "raw_images", "tiles": "tiles",
                         "params": "params:select_model",
                         "cross_validation": "params:cross_validation",
                         "predict": "params:predict",
                         **{model: f"{model}_cv_ensemble" for model in cnn_models}},
                 outputs=["champion_model", "champion_scores", "champion_outer_predictions"],
                 name="refit_champion"),
            # The sets checked on the champion's own outer answers, then its card.
            Node(prediction_set_report,
                 inputs=["champion_calibration", "champion_outer_predictions"],
                 outputs=["prediction_sets", "risk_coverage", "risk_coverage_plot",
                          "prediction_sets_mlflow"], name="prediction_set_report"),
            Node(champion_card,
                 inputs=["model_selection", "champion_scores", "prediction_sets",
                         "params:select_model"],
                 outputs="champion_model_card", name="write_champion_card"),
            # Reads the champion back from the catalog: only a completely saved file is logged.
            Node(register_champion,
                 inputs=["champion_model", "champion_scores", "champion_model_card",
                         "params:predict"],
                 outputs="champion_uri", name="register_champion"),
        ],
        tags=TAGS,
    )
    # The CNNs' predictions and fold ensembles under their namespaced names, the
    # cross_validate pipelines' outputs (Kedro's warning about dots in dataset names:
    # runtime/quiet.py).
    return Pipeline(nodes, inputs={f"{model}_{name}": f"{model}.{name}" for model in cnn_models
                                   for name in ("cv_predictions", "cv_ensemble")})
