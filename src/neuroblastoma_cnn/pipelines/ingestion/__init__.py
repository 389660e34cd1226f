"""Ingestion pipeline: raw image folder -> checked image manifest, rejected list, tile store."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
