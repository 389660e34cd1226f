"""``neuroblastoma-cnn study NAME``: runs a study, exactly as ``kedro run --pipeline=study``.

The same Kedro session, pipeline and parameters (with ``study.name`` and the given options set
as runtime parameters), so both commands resume the same Optuna study and log to the same
MLflow experiment; this one only spares the ``--params`` syntax.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.utils import find_kedro_project

from neuroblastoma_cnn.core.errors import ParameterError


@click.command(name="study")
@click.argument("name")
@click.option("--workers", type=click.IntRange(min=0), metavar="N",
              help="worker processes on this machine (0: only summarise the storage); "
                   "default: study.workers")
@click.option("--storage", metavar="URL",
              help="Optuna storage shared by every worker, e.g. postgresql://user:pw@host/db; "
                   "default: study.storage")
@click.option("-e", "--env", metavar="ENV", help="Kedro configuration environment (e.g. tiny)")
@click.option("--project", type=click.Path(file_okay=False, path_type=Path), default=None,
              metavar="DIR", help="the Kedro project (default: found from the current folder)")
def study(name: str, workers: int | None, storage: str | None, env: str | None,
          project: Path | None) -> None:
    """Run the study NAME of conf/base/parameters_study.yml (resumes it when it exists)."""
    root = find_kedro_project(project or Path.cwd())
    if root is None:
        raise ParameterError(f"No Kedro project at or above '{project or Path.cwd()}'.",
                             hint="run from the project folder or pass --project DIR")
    options: dict[str, Any] = {"name": name}
    if workers is not None:
        options["workers"] = workers
    if storage:
        options["storage"] = storage
    bootstrap_project(root)
    with KedroSession.create(project_path=root, env=env,
                             runtime_params={"study": options}) as session:
        session.run(pipeline_names=["study"])
