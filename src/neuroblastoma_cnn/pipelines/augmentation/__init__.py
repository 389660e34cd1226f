"""Augmentation pipeline: balances the training split's classes with random augmentation."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
