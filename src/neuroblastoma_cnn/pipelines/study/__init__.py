"""Studies: variants of one model's parameters, each trained on several repeats as trials of the
trials engine (``neuroblastoma_cnn.trials``), compared with paired statistics."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
