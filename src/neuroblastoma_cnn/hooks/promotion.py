"""Model promotion: a model saved by a run is promoted once its evaluation has run, logged to
MLflow with its raw-image pyfunc (what ``mlflow models serve`` runs) and registered in the
Model Registry (see ``tracking.promotion`` and ``tracking.registry``)."""

from __future__ import annotations

import logging
from typing import Any

import mlflow
from kedro.framework.hooks import hook_impl

from neuroblastoma_cnn.core.errors import ModelError
from neuroblastoma_cnn.datasets.keras_model import KerasModelDataset, local_copy, read_record
from neuroblastoma_cnn.hooks import error_display
from neuroblastoma_cnn.hooks._catalog import catalog_datasets
from neuroblastoma_cnn.hooks.run_tags import MlflowRunTagsHook
from neuroblastoma_cnn.models import families
from neuroblastoma_cnn.models.families import Capability
from neuroblastoma_cnn.params import PredictParams
from neuroblastoma_cnn.runtime import stopping
from neuroblastoma_cnn.serving.pyfunc import NAME_SUFFIX, log_raw_image_model
from neuroblastoma_cnn.tracking import promotion, registry

# The name it had as hooks.py: logging configuration that names it keeps working.
logger = logging.getLogger("neuroblastoma_cnn.hooks")


class ModelPromotionHook:
    """Promotes a model saved by this run once its training and evaluation have finished
    (see ``promotion``); records why it was not when the run fails.

    - after the training node ran (before its outputs are saved): a history without a single
      epoch stops the run, so no model is saved; a model that did not learn (constant
      validation loss, one class predicted for every image) gets a WARNING and the MLflow tag
      ``<model>.untrained``;
    - once every output of the model's namespace in this run is saved, and at least one of its
      nodes is an evaluation node: ``promotion.json: promoted``, the model logged to MLflow
      (named after its architecture), tags ``<model>.model_version`` and ``<model>.model_uri``;
      registered as a version of ``<experiment>-<architecture>`` with its key test metrics as
      tags, ``champion`` moved to it when the rules allow (see ``registry``);
    - on a failed run: ``promotion.json: failed`` with the reason, for each model saved but
      not promoted.
    """

    def __init__(self) -> None:
        self._catalog: Any = None
        self._models: dict[str, str] = {}  # namespace -> model dataset name
        self._pending: dict[str, set[str]] = {}  # namespace -> outputs not yet saved
        self._saved: set[str] = set()  # namespaces whose model this run saved
        self._epochs: dict[str, int] = {}
        self._untrained: dict[str, list[str]] = {}
        self._test_metrics: dict[str, dict[str, Any]] = {}

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any,
                            catalog: Any) -> None:
        self._catalog = catalog
        self._models, self._pending, self._saved = {}, {}, set()
        self._epochs, self._untrained, self._test_metrics = {}, {}, {}
        for name, dataset in catalog_datasets(catalog, pipeline.all_outputs()).items():
            if not (isinstance(dataset, KerasModelDataset) and dataset.promotion):
                continue
            namespace = name.rpartition(".")[0]
            nodes = [n for n in pipeline.nodes if _namespace_of(n) == namespace]
            if not any("evaluation" in n.tags for n in nodes):
                logger.warning(
                    "%s will be saved but not promoted: this run does not evaluate it (run "
                    "its whole pipeline, e.g. `kedro run --pipeline=%s`)", name,
                    namespace or "__default__")
                continue
            self._models[namespace] = name
            self._pending[namespace] = {o for n in nodes for o in n.outputs}

    @hook_impl
    def after_node_run(self, node: Any, outputs: dict[str, Any]) -> None:
        namespace = _namespace_of(node)
        model_name = self._models.get(namespace)
        if model_name is None:
            return
        history = outputs.get(f"{namespace}.training_history")
        if history is not None:  # the training node (its model is saved after calibration)
            self._check_training(namespace, history)
        metrics = outputs.get(f"{namespace}.test_metrics")
        if isinstance(metrics, dict):
            self._test_metrics[namespace] = metrics
        predictions = outputs.get(f"{namespace}.image_predictions")
        if predictions is not None:
            reason = promotion.single_class_reason(predictions)
            if reason:
                self._warn_untrained(namespace, [reason])

    def _check_training(self, namespace: str, history: Any) -> None:
        epochs = promotion.epochs_trained(history)
        if epochs < 1:
            raise ModelError(
                f"Training of {namespace} finished no epoch, so no model was saved",
                hint=f"check {namespace}.training.epochs (at least 1) and the training log",
            )
        self._epochs[namespace] = epochs
        reasons = promotion.untrained_reasons(history)
        if reasons:
            self._warn_untrained(namespace, reasons)

    def _warn_untrained(self, namespace: str, reasons: list[str]) -> None:
        known = self._untrained.setdefault(namespace, [])
        new = [r for r in reasons if r not in known]
        if not new:
            return
        known.extend(new)
        logger.warning("%s did not learn: %s. Check the learning rate, the optimizer and the "
                       "data before using this model.", namespace, "; ".join(new))
        MlflowRunTagsHook._set_tag(f"{namespace}.untrained", "; ".join(known))

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node: Any) -> None:
        dataset = self._catalog.get(dataset_name) if self._catalog is not None else None
        if (isinstance(dataset, KerasModelDataset) and dataset.log_to_mlflow
                and not dataset.promotion):  # logged at save (fold ensembles)
            self._log_raw_image_model(dataset, "model")
        namespace = _namespace_of(node)
        pending = self._pending.get(namespace)
        if pending is None:
            return
        if dataset_name == self._models[namespace]:
            self._saved.add(namespace)
        pending.discard(dataset_name)
        if not pending and namespace in self._saved:
            del self._pending[namespace]
            with stopping.critical(f"promoting {namespace}"):  # never half-registered
                self._promote(namespace)

    def _promote(self, namespace: str) -> None:
        name = self._models[namespace]
        dataset = self._catalog.get(name)
        version = dataset.resolve_save_version()
        uri = dataset.promote(epochs=self._epochs.get(namespace),
                              untrained="; ".join(self._untrained.get(namespace, [])) or None,
                              mlflow_run_id=_active_run_id())
        MlflowRunTagsHook._set_tag(f"{namespace}.model_version", version)
        logger.info("Promoted %s version %s%s", name, version,
                    f" (MLflow model {uri})" if uri else "")
        self._saved.discard(namespace)
        if uri:
            architecture, served = self._log_raw_image_model(dataset, namespace)
            self._register(namespace, architecture, served or uri)

    def _log_raw_image_model(self, dataset: KerasModelDataset, default: str
                             ) -> tuple[str | None, str | None]:
        """Logs the saved model's raw-image pyfunc (what ``mlflow models serve`` runs) beside
        its Keras flavour; returns the architecture its record names (``default`` when it
        names none; None when the file could not be read) and the pyfunc's URI. One local
        copy serves both (a remote model is downloaded once). A failure leaves a WARNING: the
        Keras model is logged and promoted already."""
        architecture = None
        if mlflow.active_run() is None:
            return architecture, None
        try:
            with local_copy(dataset.saved_path()) as local:
                architecture = read_record(local).get("architecture") or default
                settings = PredictParams.parse(self._catalog.load("params:predict"), "predict")
                name = (dataset.mlflow_model_name or architecture) + NAME_SUFFIX
                return architecture, log_raw_image_model(local, settings, name=name)
        except Exception as exc:  # DatasetError, MlflowException, OSError, a parameter error
            logger.warning("The raw-image model of '%s' was not logged to MLflow: %s",
                           dataset.saved_path(), exc)
            return architecture, None

    def _register(self, namespace: str, architecture: str | None, uri: str) -> None:
        """The promoted model as a registry version; ``champion`` if the rules allow. A store
        without a registry (some tracking servers) leaves a WARNING, not a failed run."""
        run = mlflow.active_run()
        if run is None:
            return
        try:
            if architecture is None:
                raise OSError("its saved file could not be read")
            families.family(architecture).require(Capability.SERVE)
            experiment = mlflow.get_experiment(run.info.experiment_id).name
            name = registry.registered_name(experiment, architecture)
            version, _ = registry.register_version(
                uri, name, self._test_metrics.get(namespace),
                allowed=not self._untrained.get(namespace), run_id=run.info.run_id)
        except Exception as exc:  # MlflowException, OSError, a family that cannot be served
            logger.warning("%s was promoted but not registered in the MLflow Model Registry: "
                           "%s", namespace, exc)
            return
        MlflowRunTagsHook._set_tag(f"{namespace}.registered_model", f"models:/{name}/{version}")

    @hook_impl(tryfirst=True)
    def on_pipeline_error(self, error: Exception) -> None:
        reason = error_display.reason(error)
        for namespace in sorted(self._saved):
            dataset = self._catalog.get(self._models[namespace])
            dataset.mark_failed(reason)
            logger.warning("%s version %s is not promoted: the run failed", namespace,
                           dataset.resolve_save_version())
        self._saved = set()


def _namespace_of(node: Any) -> str:
    """``resnet34`` for ``resnet34.train_model``; '' for a node outside any namespace."""
    if hasattr(node, "namespace"):
        return node.namespace or ""
    return node.name.rpartition(".")[0]


def _active_run_id() -> str | None:
    run = mlflow.active_run()
    return run.info.run_id if run else None
