"""Checks before a run starts: the project's own errors as one line, then the environment,
every parameter group, the raw images and the weights models start from (see
``preflight``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.config import MissingConfigException
from kedro.framework.hooks import hook_impl
from kedro.framework.project import pipelines

from neuroblastoma_cnn.datasets.image_folder import ImageFolderDataset
from neuroblastoma_cnn.hooks import error_display, preflight
from neuroblastoma_cnn.hooks._catalog import catalog_datasets
from neuroblastoma_cnn.params import GROUPS, SelectModelParams, validate_parameters


def _parameters(catalog: Any) -> dict[str, Any]:
    """Every parameter of the run, as Kedro merged them (typed or not)."""
    dataset = catalog.get("parameters") if "parameters" in catalog else None
    try:  # the dataset itself: catalog.load would log a line about it
        return dict(dataset.load()) if dataset is not None else {}
    except Exception:  # unreadable: no parameter-based check
        return {}


class OneLineErrorsHook:
    """The project's own errors print as one line in `kedro run` and in notebooks.

    Set up when the context is created (after Kedro configured logging, which installs rich's
    excepthook, and before any other check can fail); see ``error_display``.
    """

    @hook_impl(tryfirst=True)
    def after_context_created(self, context: Any) -> None:
        error_display.install()


class PreflightHook:
    """Checks, before anything runs, what later nodes will need (see ``preflight``).

    ``after_context_created``: the environment exists, before kedro-mlflow reads mlflow.yml
    from it (tryfirst), and every parameter group is valid (``params.validate_parameters``).
    ``before_pipeline_run``: image folders the pipeline reads hold images,
    and the weights its models start from are reachable, before kedro-mlflow opens a run
    (tryfirst): a failed check leaves no data version and no MLflow run.
    """

    def __init__(self) -> None:
        self._project_path = Path.cwd()
        self._conf_source: Path | None = None

    @hook_impl(tryfirst=True)
    def after_context_created(self, context: Any) -> None:
        error_display.install()  # before the check below can raise
        loader = context.config_loader
        self._project_path = Path(context.project_path)
        source = Path(str(getattr(loader, "conf_source", "")))
        self._conf_source = source if source.is_absolute() else self._project_path / source
        preflight.check_environment(self._conf_source, getattr(loader, "env", None),
                                    getattr(loader, "default_run_env", None))
        preflight.check_keras_backend()
        # Every parameter group at once, as one line, before kedro-mlflow sets up its store
        # (Kedro's own validation, later, reports a multi-line pydantic dump).
        try:
            raw = loader["parameters"]
        except MissingConfigException:
            return
        validate_parameters(_pipeline_groups(raw))

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any,
                            catalog: Any) -> None:
        parameters = _parameters(catalog)
        demo = self._conf_source is not None and (self._conf_source / "demo").is_dir()
        for name, dataset in catalog_datasets(catalog, pipeline.inputs()).items():
            if not isinstance(dataset, ImageFolderDataset):
                continue
            folder = Path(dataset.load())
            if name == "raw_images":
                extensions = preflight.lookup(parameters, "ingestion.extensions")
                preflight.check_raw_images(folder, extensions, demo_env=demo)
            else:
                preflight.check_folder_has_files(folder, name)
        for key, weights in preflight.model_weight_params(pipeline, parameters):
            preflight.check_weights(key, weights)
        if "params:select_model" in pipeline.inputs():  # candidates name known families
            from neuroblastoma_cnn.pipelines.select_model.nodes import (  # noqa: PLC0415
                check_candidates,  # (scikit-learn: only for this pipeline)
            )

            chosen = parameters["select_model"]
            check_candidates(chosen if isinstance(chosen, SelectModelParams)
                             else SelectModelParams.parse(chosen, "select_model"))


def _pipeline_groups(parameters: dict[str, Any]) -> dict[str, Any]:
    """The parameter groups the registered pipelines read: the stage groups, and each model
    namespace whose ``<ns>.model`` a pipeline takes (other top-level keys, e.g. a study's
    configuration, are validated where they are used)."""
    read = {name.removeprefix("params:") for p in pipelines.values() for name in p.inputs()
            if name.startswith("params:")}
    models = {name.removesuffix(".model") for name in read if name.endswith(".model")}
    return {key: value for key, value in parameters.items()
            if key in GROUPS or key in models}
