"""Project pipelines: the data pipelines found by folder, plus composed end-to-end runs."""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline


def register_pipelines() -> dict[str, Pipeline]:
    """Registers every pipeline folder, plus `data_processing` (the three data stages)."""
    pipelines = find_pipelines(raise_errors=True)
    data = [
        pipelines[name] for name in ("ingestion", "splitting", "augmentation") if name in pipelines
    ]
    if data:
        pipelines["data_processing"] = sum(data, Pipeline([]))
    pipelines["__default__"] = sum(pipelines.values(), Pipeline([]))
    return pipelines
