"""One writer in a multi-worker run: with several training workers (``TF_CONFIG``) every
worker runs the same pipeline, but only the chief writes versioned outputs under ``data/``,
logs to MLflow and registers; the others keep their outputs in memory and open no run.

Why: each worker ends training with the same weights, so a second copy of every output (and a
second MLflow run and model version) says nothing new and confuses which one to use. The
model half runs on the cluster; the data stages (whose tile stores cannot be held in memory)
are run once, on one machine, before.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl
from kedro.io import MemoryDataset

from neuroblastoma_cnn.core.errors import ParameterError
from neuroblastoma_cnn.datasets.keras_model import (
    KerasModelDataset,
    load_keras_model,
    save_keras_model,
)
from neuroblastoma_cnn.datasets.tile_store import TileStoreDataset
from neuroblastoma_cnn.runtime import distribution

logger = logging.getLogger(__name__)


class _DetachedModel(MemoryDataset):
    """A model kept by a worker that is not the chief: saved to and loaded from a temporary
    ``.keras`` file, as the chief's catalog does, so that the nodes after training get a model
    outside the cluster's strategy (the model training returned would run every prediction
    as a collective operation, waiting for a chief that predicts alone)."""

    def __init__(self) -> None:
        super().__init__(copy_mode="assign")
        self._folder = tempfile.TemporaryDirectory(prefix="nbcnn-worker-model-")

    def save(self, data: Any) -> None:
        path = Path(self._folder.name) / "model.keras"
        save_keras_model(data, path)
        super().save(load_keras_model(path))


class OneWriterHook:
    """On a worker that is not the chief: every output of the run kept in memory, kedro-mlflow
    off for the run (no MLflow run, so nothing is logged, promoted or registered)."""

    def __init__(self) -> None:
        self._context: Any = None

    @hook_impl(trylast=True)  # after kedro-mlflow has put its configuration on the context
    def after_context_created(self, context: Any) -> None:
        self._context = context

    @hook_impl(tryfirst=True)  # before kedro-mlflow opens a run and promotion looks for models
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any,
                            catalog: Any) -> None:
        if os.environ.get("TF_CONFIG"):
            _join_cluster_first(pipeline, catalog)
        if distribution.is_chief():
            return
        index = distribution.worker_index()
        stores = sorted(n for n in pipeline.all_outputs()
                        if isinstance(catalog.get(n) if n in catalog else None,
                                      TileStoreDataset))
        if stores:
            raise ParameterError(
                f"Worker {index} of the TF_CONFIG cluster would write the tile stores "
                f"{', '.join(stores)}: run the data pipelines once on one machine without "
                "TF_CONFIG, then the model half (e.g. --pipeline=resnet34) on every worker")
        kept = 0
        for name in pipeline.all_outputs():
            dataset = catalog.get(name) if name in catalog else None
            if dataset is None or isinstance(dataset, MemoryDataset):
                continue
            catalog[name] = (_DetachedModel() if isinstance(dataset, KerasModelDataset)
                             else MemoryDataset(copy_mode="assign"))
            kept += 1
        names = run_params.get("pipeline_names") or [run_params.get("pipeline_name")
                                                     or "__default__"]
        config = getattr(self._context, "mlflow", None)
        if config is not None:
            disabled = config.tracking.disable_tracking.pipelines
            config.tracking.disable_tracking.pipelines = [*disabled, *names]
        logger.info("Worker %s of the cluster: %d outputs kept in memory and no MLflow run; "
                    "the chief writes them", index, kept)


def _join_cluster_first(pipeline: Any, catalog: Any) -> None:
    """Creates the ``MultiWorkerMirroredStrategy`` before any node runs, when a training node
    of this run will use it: TensorFlow configures the cluster only before its first operation,
    and an earlier node (the training-input figure) would otherwise make one first."""
    for node in pipeline.nodes:
        settings = [name for name in node.inputs
                    if name.startswith("params:") and name.endswith(".training")]
        if not node.name.endswith("train_model") or not settings:
            continue
        p = catalog.load(settings[0])
        get = p.get if isinstance(p, dict) else lambda key, p=p: getattr(p, key)
        chosen = distribution.current_plan(get("distribution"), get("precision"),
                                           get("jit_compile"))
        if chosen.strategy == "multi_worker":
            distribution.make_strategy(chosen)
            logger.info("Joined the TF_CONFIG cluster (%d workers) before the first node",
                        chosen.workers)
            return
