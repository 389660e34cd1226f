"""Which MLflow tracking store a run uses: a relative SQLite store anchored at the project
root, or the tracking server ``MLFLOW_TRACKING_URI`` names."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kedro.config import MissingConfigException
from kedro.framework.hooks import hook_impl

from neuroblastoma_cnn.hooks import error_display, preflight


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

    def __init__(self) -> None:
        self._from_project_conf: set[str] = set()

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
        shared = os.environ.get("MLFLOW_TRACKING_URI")
        # mlflow.set_tracking_uri exports the variable itself: a URI this process took from
        # mlflow.yml in an earlier session (a notebook, a test) is not the user's choice.
        if shared and shared not in self._from_project_conf:
            conf = _without_local_artifact_location(conf)
            loader["mlflow"] = {**conf, "server": {**server, "mlflow_tracking_uri": shared}}
            _check_server(shared)
            return
        if isinstance(uri, str) and uri.startswith(("http://", "https://")):
            conf = _without_local_artifact_location(conf)
            loader["mlflow"] = conf
            _check_server(uri)
            return
        absolute = project_sqlite_uri(uri, Path(context.project_path))
        if isinstance(absolute, str):
            self._from_project_conf.add(absolute)
        if absolute != uri:
            loader["mlflow"] = {**conf, "server": {**server, "mlflow_tracking_uri": absolute}}


def _check_server(uri: str) -> None:
    """A tracking server answers and accepts the credentials, as one line before
    kedro-mlflow contacts it (``preflight.check_tracking_server``)."""
    error_display.install()  # this hook may run before the others install it
    preflight.check_tracking_server(uri)


def _without_local_artifact_location(conf: dict[str, Any]) -> dict[str, Any]:
    """mlflow.yml without the experiment's local ``artifact_location``: with a tracking server
    the server decides where artifacts go (``--serve-artifacts``), not a local folder."""
    tracking = dict(conf.get("tracking") or {})
    experiment = dict(tracking.get("experiment") or {})
    kwargs = dict(experiment.get("create_experiment_kwargs") or {})
    kwargs.pop("artifact_location", None)
    experiment["create_experiment_kwargs"] = kwargs
    tracking["experiment"] = experiment
    return {**conf, "tracking": tracking}
