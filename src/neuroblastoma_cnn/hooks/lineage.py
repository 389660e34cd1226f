"""Lineage: ``lineage.json`` beside every versioned output, inputs of one lineage only, and a
saved version for every versioned input of a run (see ``tracking.lineage``)."""

from __future__ import annotations

import contextlib
from typing import Any

from kedro.framework.hooks import hook_impl
from kedro.framework.project import pipelines
from kedro.io.core import AbstractVersionedDataset

from neuroblastoma_cnn.core.errors import DataError
from neuroblastoma_cnn.hooks import preflight
from neuroblastoma_cnn.hooks._catalog import catalog_datasets
from neuroblastoma_cnn.hooks.run_tags import MlflowRunTagsHook
from neuroblastoma_cnn.tracking import lineage


class LineageHook:
    """Writes ``lineage.json`` beside every versioned output, and stops a run whose inputs
    come from different lineages (see ``lineage``).

    The check runs on the pipeline's free inputs before kedro-mlflow opens a run (tryfirst),
    then on each node's inputs. Every version read or written is also tagged on the MLflow run
    (``data.<dataset>``), which is how ``prune`` knows what a run still references.
    """

    def __init__(self) -> None:
        self._catalog: Any = None
        self._inputs: dict[str, dict[str, str]] = {}  # node name -> input versions
        self._made_from: dict[str, dict[str, str]] = {}  # node name -> all ancestors
        self._in_memory: dict[str, dict[str, str]] = {}  # unversioned output -> its ancestors
        self._tagged: dict[str, str] = {}

    def _versions(self, names: Any) -> tuple[dict[str, str], dict[str, Any]]:
        """Loaded versions of the versioned datasets among ``names``, and the lineage of each
        input (for an in-memory one, the lineage of the node that made it in this run)."""
        versions, records = {}, {}
        for name, dataset in catalog_datasets(self._catalog, names).items():
            if name in self._in_memory:
                records[name] = {"made_from": self._in_memory[name]}
                continue
            version = lineage.load_version(dataset)
            if version is None:
                continue
            versions[name] = version
            records[name] = lineage.read_lineage(lineage.version_folder(dataset, version))
        return versions, records

    def _tag(self, name: str, version: str) -> None:
        if self._tagged.get(name) != version and MlflowRunTagsHook._set_tag(
                f"data.{name}", version):
            self._tagged[name] = version

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any,
                            catalog: Any) -> None:
        self._catalog = catalog
        self._inputs, self._made_from, self._in_memory, self._tagged = {}, {}, {}, {}
        inputs = pipeline.inputs()
        versions, records = self._versions(inputs)
        _require_versions(catalog, inputs, versions)
        names = "+".join(run_params.get("pipeline_names") or ["__default__"])
        lineage.check_same_lineage(versions, records, where=f"pipeline {names}")

    @hook_impl
    def before_node_run(self, node: Any, catalog: Any) -> None:
        self._catalog = catalog
        versions, records = self._versions(node.inputs)
        lineage.check_same_lineage(versions, records, where=f"node {node.name}")
        self._inputs[node.name] = versions
        self._made_from[node.name] = lineage.made_from(versions, records)
        for name, version in versions.items():
            self._tag(name, version)

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node: Any) -> None:
        dataset = self._catalog.get(dataset_name) if self._catalog is not None else None
        version = dataset.resolve_save_version() if isinstance(
            dataset, AbstractVersionedDataset) else None
        folder = lineage.version_folder(dataset, version) if version else None
        if folder is None:  # kept in memory (or not versioned): its consumers inherit lineage
            self._in_memory[dataset_name] = self._made_from.get(node.name, {})
            return
        self._tag(dataset_name, version)
        record = {
            "dataset": dataset_name, "version": version, "node": node.name,
            "inputs": self._inputs.get(node.name, {}),
            "made_from": self._made_from.get(node.name, {}),
        }
        with contextlib.suppress(FileExistsError):  # saved twice in one run: keep the first
            lineage.write_lineage(folder, record)


def _require_versions(catalog: Any, inputs: Any, found: dict[str, str]) -> None:
    """Every versioned input of the run has a saved version (unless pinned with
    --load-versions, which Kedro checks itself); otherwise one line naming them all and the
    smallest pipeline that makes them."""
    missing = {}
    for name, dataset in catalog_datasets(catalog, inputs).items():
        if name in found or not isinstance(dataset, AbstractVersionedDataset):
            continue
        if dataset._version and not dataset._version.load:
            folder = lineage.version_folder(dataset, "*")
            missing[name] = preflight.shown(folder.parent) if folder else name
    if not missing:
        return
    makers = _pipelines_making(set(missing))
    raise DataError(
        "No saved version of " + ", ".join(f"{n} ({where})" for n, where in missing.items()),
        hint=(f"run `kedro run --pipeline={makers[0]}` first" if makers else
              "run the pipelines that make them first"),
    )


def _pipelines_making(names: set[str]) -> list[str]:
    """Registered pipelines that output all of ``names``, smallest first."""
    makers = [(len(p.nodes), name) for name, p in pipelines.items()
              if name != "__default__" and names <= p.all_outputs()]
    return [name for _, name in sorted(makers)]
