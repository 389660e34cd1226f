"""Project hooks, registered in ``settings.py``; one module per concern:

- ``checks``: the project's own errors as one line; the pre-flight checks before a run starts;
- ``mlflow_store``: the MLflow tracking store anchored at the project root;
- ``run_tags``: MLflow run tags (git commit, manifest hash, tiles version, model used, failure);
- ``run_command``: how a run was started (``kedro run`` command, commit), for the model card;
- ``lineage``: ``lineage.json`` beside every versioned output, inputs of one lineage;
- ``promotion``: a model promoted once evaluated, logged to MLflow and registered;
- ``stopping``: a run stopped by SIGINT/SIGTERM ends KILLED; runs whose process is gone too;
- ``workers``: in a multi-worker (``TF_CONFIG``) run only the chief writes, logs and registers;

and what they use: ``error_display`` (one line for the project's errors, in ``kedro run`` and
notebooks) and ``preflight`` (the checks themselves, plain functions).

``neuroblastoma_cnn.hooks`` is the import path: every hook and helper is re-exported here.
"""

from neuroblastoma_cnn.hooks.checks import OneLineErrorsHook, PreflightHook
from neuroblastoma_cnn.hooks.lineage import LineageHook
from neuroblastoma_cnn.hooks.mlflow_store import ProjectMlflowStoreHook, project_sqlite_uri
from neuroblastoma_cnn.hooks.promotion import ModelPromotionHook
from neuroblastoma_cnn.hooks.run_command import RunContextHook, kedro_command, run_context
from neuroblastoma_cnn.hooks.run_tags import (
    MAX_TAG_LENGTH,
    MlflowRunTagsHook,
    frame_sha256,
    git_commit,
    model_tags,
)
from neuroblastoma_cnn.hooks.stopping import RunStopHook
from neuroblastoma_cnn.hooks.workers import OneWriterHook

__all__ = [
    "MAX_TAG_LENGTH",
    "LineageHook",
    "MlflowRunTagsHook",
    "ModelPromotionHook",
    "OneLineErrorsHook",
    "OneWriterHook",
    "PreflightHook",
    "ProjectMlflowStoreHook",
    "RunContextHook",
    "RunStopHook",
    "frame_sha256",
    "git_commit",
    "kedro_command",
    "model_tags",
    "project_sqlite_uri",
    "run_context",
]
