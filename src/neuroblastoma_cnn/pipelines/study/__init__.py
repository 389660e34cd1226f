"""Studies: a study's experiments as resumable, parallel trials compared with paired statistics."""

from .pipeline import create_pipeline
from .trial import ProjectSteps

__all__ = ["ProjectSteps", "create_pipeline"]
