"""Cross-validation: K folds of whole patients, each a trial of the trials engine, the classical
floor on the same folds, the fold ensemble and the report (README "Cross-validation")."""

from .pipeline import create_data_pipeline, create_pipeline

__all__ = ["create_data_pipeline", "create_pipeline"]
