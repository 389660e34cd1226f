"""Project hooks: tag every MLflow run with what it was made from."""

from __future__ import annotations

import hashlib
import logging
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd
from kedro.config import MissingConfigException
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


def project_sqlite_uri(uri: Any, project_path: Path) -> Any:
    """`sqlite:///mlflow.db` (relative) -> `sqlite:////<project>/mlflow.db`; others unchanged."""
    prefix = "sqlite:///"
    if not isinstance(uri, str) or not uri.startswith(prefix):
        return uri
    path = uri[len(prefix):]
    if not path or path.startswith("/") or path == ":memory:":
        return uri
    return f"{prefix}{(Path(project_path) / path).resolve().as_posix()}"


class ProjectMlflowStoreHook:
    """Anchors a relative SQLite tracking store at the project root instead of the cwd.

    SQLAlchemy reads `sqlite:///mlflow.db` relative to the current folder, so a notebook in
    notebooks/ or a `kedro` command from a sub-folder would silently open a new, empty store.
    Runs before kedro-mlflow reads mlflow.yml (tryfirst) and hands it the absolute URI.
    """

    @hook_impl(tryfirst=True)
    def after_context_created(self, context: Any) -> None:
        loader = context.config_loader
        loader.config_patterns.setdefault("mlflow", ["mlflow*", "mlflow*/**", "**/mlflow*"])
        try:
            conf = loader["mlflow"]
        except MissingConfigException:  # no mlflow.yml: kedro-mlflow uses its defaults
            return
        server = conf.get("server") or {}
        uri = server.get("mlflow_tracking_uri")
        absolute = project_sqlite_uri(uri, Path(context.project_path))
        if absolute != uri:
            loader["mlflow"] = {**conf, "server": {**server, "mlflow_tracking_uri": absolute}}
