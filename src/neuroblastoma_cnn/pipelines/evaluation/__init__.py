"""Evaluation: test predictions, metrics and figures, shared by every model through namespaces."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
