"""How a run was started, for the model card: the ``kedro run`` command that repeats it, its git
commit and session, handed to the nodes as the ``run_context`` input."""

from __future__ import annotations

import shlex
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

from neuroblastoma_cnn.hooks.run_tags import git_commit

#: ``kedro run`` options rebuilt from Kedro's run parameters, in the CLI's own spelling.
_RUN_OPTIONS = (("env", "--env"), ("tags", "--tags"), ("node_names", "--nodes"),
                ("from_nodes", "--from-nodes"), ("to_nodes", "--to-nodes"),
                ("from_inputs", "--from-inputs"), ("to_outputs", "--to-outputs"),
                ("namespaces", "--namespaces"))


def _flat_params(values: Any, prefix: str = "") -> list[str]:
    """``{"a": {"b": 1}}`` -> ``["a.b=1"]``: the ``--params`` syntax (dotted keys)."""
    if not isinstance(values, dict):
        return [f"{prefix}={values}"]
    out = []
    for key, value in values.items():
        out += _flat_params(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def kedro_command(run_params: dict[str, Any]) -> str:
    """The ``kedro run`` command line that repeats a run, from its session's run parameters."""
    parts = ["kedro", "run", f"--pipeline={','.join(run_params.get('pipeline_names') or [])}"
             if run_params.get("pipeline_names") else ""]
    for key, option in _RUN_OPTIONS:
        value = run_params.get(key)
        if value and key == "env":
            parts.append(f"{option}={value}")
        elif value:
            parts.append(f"{option}={','.join(map(str, value))}")
    if run_params.get("load_versions"):
        parts.append("--load-versions=" + ",".join(
            f"{k}:{v}" for k, v in run_params["load_versions"].items()))
    if run_params.get("runtime_params"):
        parts.append("--params=" + ",".join(_flat_params(run_params["runtime_params"])))
    return " ".join(shlex.quote(p) if p not in ("kedro", "run") else p for p in parts if p)


def run_context(run_params: dict[str, Any], project_path: Path) -> dict[str, Any]:
    """What a model card says about its run: command, git commit, session, start time."""
    return {"command": kedro_command(run_params), "git_commit": git_commit(project_path),
            "session_id": run_params.get("run_id") or run_params.get("session_id"),
            "kedro_version": run_params.get("kedro_version"),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}


class RunContextHook:
    """Hands the run's nodes ``run_context`` (see :func:`run_context`): nodes stay pure and
    know nothing of Kedro's session, yet the model card can say how to reproduce the run."""

    def __init__(self) -> None:
        self._project_path = Path.cwd()

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        self._project_path = Path(context.project_path)

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any,
                            catalog: Any) -> None:
        if "run_context" not in pipeline.inputs():
            return
        context = run_context(run_params, self._project_path)
        if "run_context" in catalog:  # the declared MemoryDataset: filled, not replaced
            catalog.get("run_context").save(context)
        else:
            catalog["run_context"] = context
