"""Kedro project settings: hooks, config loader and the environments it merges."""

from kedro.config import OmegaConfigLoader

from neuroblastoma_cnn.hooks import MlflowRunTagsHook, ProjectMlflowStoreHook
from neuroblastoma_cnn.quiet import QuietRunHook

HOOKS = (MlflowRunTagsHook(), ProjectMlflowStoreHook(), QuietRunHook())

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # Environments such as `tiny` override single keys (e.g. `ingestion.input_size`) without
    # restating the whole parameter block, so parameters and catalog are merged key by key.
    "merge_strategy": {"parameters": "soft", "catalog": "soft", "mlflow": "soft"},
}
