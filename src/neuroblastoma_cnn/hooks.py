"""Project hooks: tag every MLflow run with what it was made from."""

from __future__ import annotations

import hashlib
import logging
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd
from kedro.framework.hooks import hook_impl

logger = logging.getLogger(__name__)


def git_commit(path: Path) -> str:
    """The checked-out commit (with '-dirty' when files changed), or 'unknown' outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def frame_sha256(frame: pd.DataFrame) -> str:
    """A content hash of a table that does not depend on how it was stored."""
    return hashlib.sha256(frame.to_csv(index=False).encode()).hexdigest()


class MlflowRunTagsHook:
    """Tags the active MLflow run with the git commit, the manifest hash and the tiles version.

    kedro-mlflow opens the run in its own `before_pipeline_run`; tagging from the node and
    dataset hooks guarantees the run exists, whatever order the hooks were registered in.
    """

    def __init__(self) -> None:
        self._project_path = Path.cwd()
        self._tagged_commit = False

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        self._project_path = Path(context.project_path)
        self._tagged_commit = False

    @staticmethod
    def _set_tag(key: str, value: str) -> bool:
        import mlflow

        if mlflow.active_run() is None:
            return False
        mlflow.set_tag(key, value)
        return True

    @hook_impl
    def before_node_run(self) -> None:
        if not self._tagged_commit:
            self._tagged_commit = self._set_tag("git_commit", git_commit(self._project_path))

    def _tag_inputs(self, dataset_name: str, data: Any) -> None:
        """The manifest's hash, and for runs that start from stored tiles, their version."""
        if dataset_name == "image_manifest" and isinstance(data, pd.DataFrame):
            self._set_tag("manifest_sha256", frame_sha256(data))
        elif dataset_name == "tiles" and hasattr(data, "path"):
            self._set_tag("tiles_version", Path(data.path).parent.name)

    @hook_impl
    def after_dataset_loaded(self, dataset_name: str, data: Any) -> None:
        self._tag_inputs(dataset_name, data)

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any) -> None:
        self._tag_inputs(dataset_name, data)
