"""Studies: a study's experiments as resumable, parallel trials compared with paired statistics."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
