"""MLflow run tags: what a run was made from (git commit, manifest hash, tiles version), which
model a prediction used, and why a run failed."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from kedro.framework.hooks import hook_impl

from neuroblastoma_cnn.hooks import error_display
from neuroblastoma_cnn.tracking import privacy, promotion

MAX_TAG_LENGTH = 5000  # MLflow refuses longer tag values (8000 in MLflow 3; kept well under)


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
        if mlflow.active_run() is None:
            return False
        mlflow.set_tag(key, privacy.scrub_text(str(value)))  # no patient id in clear
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

    @hook_impl
    def after_node_run(self, outputs: dict[str, Any]) -> None:
        """A node that picked a model (prediction): which one, so the run says what it used."""
        for value in outputs.values():
            source = getattr(value, "model_source", None)
            if isinstance(source, str):
                for key, tag in model_tags(source).items():
                    self._set_tag(f"predict.{key}", tag)

    @hook_impl(tryfirst=True)
    def on_pipeline_error(self, error: Exception) -> None:
        """The reason a run failed, as a tag (kedro-mlflow then ends it FAILED)."""
        reason = error_display.reason(error)
        self._set_tag("failure_reason", reason[:MAX_TAG_LENGTH])


def model_tags(source: str) -> dict[str, str]:
    """``model`` (the path or URI a model was loaded from), ``model_version`` and, when known,
    ``model_uri`` (the MLflow model): a catalog path ``.../model.keras/<version>/model.keras``
    gives its version and the URI its promotion recorded; ``models:/NAME/VERSION`` both."""
    tags = {"model": source}
    if source.startswith(("models:/", "runs:/")):
        tags["model_uri"] = source
        parts = source.split("/")
        if source.startswith("models:/") and len(parts) >= 3 and "@" not in parts[1]:
            tags["model_version"] = parts[-1]
        return tags
    path = Path(source)
    if path.parent.parent.name == path.name:  # <name>/<version>/<name>: a catalog version
        tags["model_version"] = path.parent.name
        status = promotion.read_status(path.parent) or {}
        if status.get("mlflow_model_uri"):
            tags["model_uri"] = status["mlflow_model_uri"]
    return tags
