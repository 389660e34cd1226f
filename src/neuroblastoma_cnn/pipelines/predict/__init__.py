"""Prediction: classify new images with a trained model, with Grad-CAM overlays."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
