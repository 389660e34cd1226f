"""Kedro project settings: hooks, config loader and the environments it merges."""

from kedro.config import OmegaConfigLoader

from neuroblastoma_cnn.hooks import (
    LineageHook,
    MlflowRunTagsHook,
    ModelPromotionHook,
    OneLineErrorsHook,
    OneWriterHook,
    PreflightHook,
    ProjectMlflowStoreHook,
    RunContextHook,
    RunStopHook,
)
from neuroblastoma_cnn.params import TypedParamsMlflowHook
from neuroblastoma_cnn.runtime.quiet import QuietRunHook
from neuroblastoma_cnn.tracking.privacy import PrivacyHook

HOOKS = (
    OneLineErrorsHook(),      # the project's own errors as one line (kedro run, notebooks)
    PreflightHook(),          # environment, raw images, weights: before anything runs
    LineageHook(),            # lineage.json beside each output; inputs of one lineage
    ModelPromotionHook(),     # a model is used only once trained and evaluated
    MlflowRunTagsHook(),
    ProjectMlflowStoreHook(),
    TypedParamsMlflowHook(),  # kedro-mlflow logs typed parameter groups as plain values
    QuietRunHook(),
    PrivacyHook(),            # patient ids pseudonymised in whatever reaches MLflow
    RunContextHook(),         # how the run was started, for the model card
    RunStopHook(),            # SIGINT/SIGTERM end the MLflow run KILLED; orphans marked too
    OneWriterHook(),          # several TF_CONFIG workers: only the chief writes and logs
)

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # Environments such as `tiny` override single keys (e.g. `ingestion.input_size`) without
    # restating the whole parameter block, so parameters and catalog are merged key by key.
    "merge_strategy": {"parameters": "soft", "catalog": "soft", "mlflow": "soft"},
}
