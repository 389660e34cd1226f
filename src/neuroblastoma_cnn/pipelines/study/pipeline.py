"""Study pipeline: prepare (parameters only), run the trials, summarise.

The trials train and evaluate with the ``training`` and ``evaluation`` pipelines' own node
functions, which ``pipeline_registry`` passes in as ``steps`` (pipelines do not import each
other). Not part of ``__default__``: a study trains many models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
from kedro.pipeline import Node, Pipeline

from neuroblastoma_cnn.datasets.tile_store import TileStore
from neuroblastoma_cnn.params import EvaluationParams
from neuroblastoma_cnn.trials.plan import StudyPlan
from neuroblastoma_cnn.trials.trial import ProjectSteps

from .nodes import prepare_study, run_study_trials, summarize_study

TAGS = ["model", "study"]


def create_pipeline(steps: ProjectSteps | None = None, models: Sequence[str] = (),
                    **kwargs) -> Pipeline:
    """``steps``: the project's training and evaluation functions (required to run trials);
    ``models``: the models whose parameter blocks (``params:<model>``) studies may vary."""
    if steps is None:
        raise ValueError("The study pipeline needs the project's training and evaluation "
                         "functions: build it through pipeline_registry.register_pipelines().")
    return Pipeline(
        [
            Node(prepare_study,
                 inputs={"study": "params:study", **{m: f"params:{m}" for m in models}},
                 outputs="study_plan", name="prepare_study"),
            Node(_with_steps(steps),
                 inputs=["study_plan", "augmented_train_tiles", "tiles", "split_table",
                         "params:evaluation"],
                 outputs="study_trials", name="run_study_trials"),
            Node(summarize_study, inputs=["study_trials", "study_plan"],
                 outputs=["study_summary", "study_report", "study_plot",
                          "study_best_parameters"],
                 name="summarize_study"),
        ],
        tags=TAGS,
    )


def _with_steps(steps: ProjectSteps) -> Callable[..., pd.DataFrame]:
    """``run_study_trials`` with the project's functions bound (a plain function: Kedro and
    kedro-viz read its signature and type hints)."""

    def run_study_trials_node(plan: StudyPlan, augmented_train_tiles: TileStore,
                              tiles: TileStore, split_table: pd.DataFrame,
                              evaluation: EvaluationParams) -> pd.DataFrame:
        return run_study_trials(plan, augmented_train_tiles, tiles, split_table, evaluation,
                                steps)

    run_study_trials_node.__doc__ = run_study_trials.__doc__
    return run_study_trials_node
