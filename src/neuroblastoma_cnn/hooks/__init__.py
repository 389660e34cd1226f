"""Project hooks (registered in ``settings.py``); being split into modules, see ``promotion``."""

from neuroblastoma_cnn.hooks.promotion import (
    MAX_TAG_LENGTH,
    LineageHook,
    MlflowRunTagsHook,
    ModelPromotionHook,
    OneLineErrorsHook,
    PreflightHook,
    ProjectMlflowStoreHook,
    RunContextHook,
    frame_sha256,
    git_commit,
    kedro_command,
    model_tags,
    project_sqlite_uri,
    run_context,
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
