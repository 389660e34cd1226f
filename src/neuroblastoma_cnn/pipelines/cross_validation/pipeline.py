"""Cross-validation pipelines: the folds and the classical floor on them (shared by every
model), then one model's folds (trials of the trials engine), its fold ensemble and the report.

The folds train and evaluate with the ``training`` and ``evaluation`` pipelines' own node
functions, which ``pipeline_registry`` passes in as ``steps`` (pipelines do not import each
other). ``kedro run --pipeline=cross_validate`` (``cross_validate_<model>``) runs them.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
from kedro.pipeline import Node, Pipeline

from neuroblastoma_cnn.datasets.tile_store import TileStore
from neuroblastoma_cnn.params import CrossValidationParams, EvaluationParams
from neuroblastoma_cnn.trials.trial import ProjectSteps

from .nodes import assign_cv_folds, build_cv_ensemble, cross_validate_floor, run_cv_folds
from .report import summarize_cross_validation, write_cv_model_card

TAGS = ["model", "cross_validation"]


def create_data_pipeline() -> Pipeline:
    """The folds and the classical floor on them: shared by every model's cross-validation."""
    return Pipeline(
        [
            Node(assign_cv_folds, inputs=["split_table", "params:cross_validation"],
                 outputs="cv_folds", name="assign_cv_folds"),
            Node(cross_validate_floor,
                 inputs=["cv_folds", "raw_images", "params:cross_validation"],
                 outputs="cv_floor_predictions", name="cross_validate_floor"),
        ],
        tags=TAGS,
    )


def create_pipeline(steps: ProjectSteps | None = None, model: str | None = None,
                    **kwargs) -> Pipeline:
    """One model's folds, ensemble and report, written without a namespace: the registry puts
    it in the model's (``resnet34.cv_summary``, ``params:resnet34.training``...)."""
    if steps is None or not model:
        raise ValueError("The cross-validation pipeline needs the project's training and "
                         "evaluation functions: build it through pipeline_registry.")
    return Pipeline(
        [
            Node(_folds_with_steps(steps, model),
                 inputs=["params:model", "params:training", "tiles", "split_table", "cv_folds",
                         "params:evaluation", "params:cross_validation"],
                 outputs=["cv_trials", "cv_predictions"], name="run_cv_folds"),
            Node(build_cv_ensemble, inputs=["cv_trials", "params:cross_validation"],
                 outputs="cv_ensemble", name="build_cv_ensemble"),
            Node(summarize_cross_validation,
                 inputs=["cv_predictions", "cv_floor_predictions", "cv_trials",
                         "params:evaluation", "params:cross_validation"],
                 outputs=["cv_summary", "cv_fold_metrics", "cv_report", "cv_confusion_matrix",
                          "cv_confusion_matrix_plot", "cv_metrics_mlflow"],
                 name="summarize_cross_validation"),
            Node(write_cv_model_card,
                 inputs=["cv_summary", "cv_folds", "tiles", "params:model", "params:training",
                         "run_context"],
                 outputs=["cv_model_card", "cv_model_card_html"], name="write_cv_model_card"),
        ],
        tags=TAGS,
    )


def _folds_with_steps(steps: ProjectSteps, model: str) -> Callable[..., tuple]:
    """``run_cv_folds`` with the model's name and the project's functions bound."""

    def run_cv_folds_node(model_params: dict, training_params: dict, tiles: TileStore,
                          split_table: pd.DataFrame, cv_folds: pd.DataFrame,
                          evaluation: EvaluationParams, params: CrossValidationParams
                          ) -> tuple[pd.DataFrame, pd.DataFrame]:
        return run_cv_folds(model, model_params, training_params, tiles, split_table,
                            cv_folds, evaluation, params, steps)

    run_cv_folds_node.__doc__ = run_cv_folds.__doc__
    return run_cv_folds_node
