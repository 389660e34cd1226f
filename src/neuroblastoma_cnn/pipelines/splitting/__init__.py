"""Splitting pipeline: assigns tiles to train / validation / test and cross-validation folds."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
