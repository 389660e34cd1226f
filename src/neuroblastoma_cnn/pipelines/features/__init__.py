"""CNN features with scikit-learn heads (the study's third technique)."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
