"""Studies and cross-validation: many trainings of one model as resumable, parallel trials
(a study's variants and repeats, or a cross-validation's folds), compared with paired
statistics."""

from .pipeline import create_cv_data_pipeline, create_cv_pipeline, create_pipeline
from .trial import ProjectSteps

__all__ = ["ProjectSteps", "create_cv_data_pipeline", "create_cv_pipeline", "create_pipeline"]
