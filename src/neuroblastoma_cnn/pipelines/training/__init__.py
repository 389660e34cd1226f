"""Training: one pipeline template shared by every architecture through namespaces."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
