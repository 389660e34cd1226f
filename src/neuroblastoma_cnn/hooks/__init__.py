"""Project hooks (registered in ``settings.py``); being split into modules."""

from neuroblastoma_cnn.hooks.checks import OneLineErrorsHook, PreflightHook
from neuroblastoma_cnn.hooks.mlflow_store import ProjectMlflowStoreHook, project_sqlite_uri
from neuroblastoma_cnn.hooks.promotion import LineageHook, ModelPromotionHook
from neuroblastoma_cnn.hooks.run_command import RunContextHook, kedro_command, run_context
from neuroblastoma_cnn.hooks.run_tags import (
    MAX_TAG_LENGTH,
    MlflowRunTagsHook,
    frame_sha256,
    git_commit,
    model_tags,
)

__all__ = [
    "MAX_TAG_LENGTH",
    "LineageHook",
    "MlflowRunTagsHook",
    "ModelPromotionHook",
    "OneLineErrorsHook",
    "PreflightHook",
    "ProjectMlflowStoreHook",
    "RunContextHook",
    "frame_sha256",
    "git_commit",
    "kedro_command",
    "model_tags",
    "project_sqlite_uri",
    "run_context",
]
