"""Model selection: every candidate family on the same grouped folds, a stacked hybrid, the
ranking table, and the winner's prediction sets (README "Choosing a model")."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
