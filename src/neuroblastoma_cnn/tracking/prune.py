"""``neuroblastoma-cnn prune``: delete old data and model versions, never one an MLflow run uses.

Every run adds a version of each artifact it writes (tiles, augmented tiles, an 80 MB model...),
so ``data/`` only grows. A version folder ``<artifact>/<version>/`` is deleted when all hold:

- it is not among the ``--keep`` newest versions of its artifact (a model version whose
  promotion failed, or any version written by a FAILED or KILLED run, does not count among
  them: nobody can use it);
- no MLflow run that still references data names its version. Those runs are the
  ``FINISHED`` and ``RUNNING`` runs not deleted in MLflow, in every experiment; a run names a
  version in its tags (``data.<dataset>``, ``run_id``: what it read and wrote;
  ``tiles_version``, ``<model>.model_version``, ``predict.model``...). A FAILED run's outputs
  are leftovers and keep nothing;
- no kept version was made from it (its ``lineage.json``): a kept model keeps the tiles, split
  and augmented tiles it was trained on.

Versions are Kedro's timestamps, which every artifact written by one run shares; a referenced
timestamp keeps every artifact of that run. Deleting a run in the MLflow UI (or ``mlflow gc``)
is how its data becomes prunable. MLflow's own artifacts are never touched (a logged model is a
hard link of its catalog file, so deleting the catalog version frees nothing while MLflow keeps
it). Dry run by default: ``--yes`` deletes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import click

from neuroblastoma_cnn.tracking.lineage import LINEAGE_FILE
from neuroblastoma_cnn.tracking.promotion import FAILED, read_status

logger = logging.getLogger(__name__)

# Kedro's version strings: generate_timestamp() -> 2026-11-25T22.34.45.206Z
VERSION = re.compile(r"\d{4}-\d\d-\d\dT\d\d\.\d\d\.\d\d\.\d{3}Z")
REFERENCING_STATUSES = ("FINISHED", "RUNNING")
FAILED_STATUSES = ("FAILED", "KILLED")
DEFAULT_KEEP = 3


@dataclass
class VersionFolder:
    artifact: Path  # <data>/<layer>/.../<name>
    version: str

    @property
    def path(self) -> Path:
        return self.artifact / self.version


@dataclass
class PrunePlan:
    delete: list[VersionFolder] = field(default_factory=list)
    keep: list[VersionFolder] = field(default_factory=list)
    referenced: set[str] = field(default_factory=set)
    failed_runs: set[str] = field(default_factory=set)  # versions written by failed runs
    runs: int = 0
    bytes_freed: int = 0


def find_versions(data_dir: Path) -> dict[Path, list[str]]:
    """``{artifact folder: [versions, oldest first]}`` of every versioned artifact under
    ``data_dir``: a folder whose sub-folders are named by Kedro versions."""
    found: dict[Path, list[str]] = {}
    for root, dirs, _files in os.walk(data_dir):
        versions = sorted(d for d in dirs if VERSION.fullmatch(d))
        if versions:
            found[Path(root)] = versions
            dirs[:] = [d for d in dirs if not VERSION.fullmatch(d)]  # no artifact inside one
    return found


def referenced_versions(tracking_uri: str | None) -> tuple[set[str], int, set[str]]:
    """Versions named in the tags of MLflow runs that still reference data, how many such runs
    there are, and the versions that failed runs wrote (their ``run_id``: Kedro's save
    version)."""
    if not tracking_uri:
        return set(), 0, set()
    import mlflow  # noqa: PLC0415  (lazy: slow to import, only this command needs it)
    from mlflow.entities import ViewType  # noqa: PLC0415  (lazy, as mlflow)

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiments = client.search_experiments(view_type=ViewType.ALL)
    versions: set[str] = set()
    failed: set[str] = set()
    runs = 0
    token = None
    ids = [e.experiment_id for e in experiments]
    while ids:
        page = client.search_runs(ids, run_view_type=ViewType.ACTIVE_ONLY,
                                  max_results=1000, page_token=token)
        for run in page:
            if run.info.status in FAILED_STATUSES:
                failed.update(VERSION.findall(run.data.tags.get("run_id", "")))
            if run.info.status not in REFERENCING_STATUSES:
                continue
            runs += 1
            for value in run.data.tags.values():
                versions.update(VERSION.findall(str(value)))
        token = page.token
        if not token:
            break
    return versions, runs, failed - versions


def _made_from(folder: Path) -> set[str]:
    try:
        record = json.loads((folder / LINEAGE_FILE).read_text())
    except (OSError, ValueError):
        return set()
    return {str(v) for v in (record.get("made_from") or {}).values()}


def _failed(folder: Path) -> bool:
    status = read_status(folder)
    return bool(status) and status.get("status") == FAILED


def _size(path: Path) -> int:
    """Bytes deleting ``path`` frees: files with no other hard link."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            stat = (Path(root) / name).lstat()
            if stat.st_nlink == 1:
                total += stat.st_size
    return total


def plan(data_dir: str | Path, keep: int = DEFAULT_KEEP, tracking_uri: str | None = None
         ) -> PrunePlan:
    """What ``prune`` would delete and keep (nothing is deleted here)."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    result = PrunePlan()
    result.referenced, result.runs, result.failed_runs = referenced_versions(tracking_uri)
    artifacts = find_versions(Path(data_dir))
    kept: dict[Path, set[str]] = {}
    for artifact, versions in artifacts.items():
        usable = [v for v in versions
                  if v not in result.failed_runs and not _failed(artifact / v)]
        kept[artifact] = set(usable[-keep:]) | (set(versions) & result.referenced)
    # Lineage: a kept version keeps the versions it was made from, transitively.
    wanted = set(result.referenced)
    changed = True
    while changed:
        changed = False
        for artifact, versions in kept.items():
            for version in list(versions):
                for ancestor in _made_from(artifact / version) - wanted:
                    wanted.add(ancestor)
                    changed = True
        for artifact, versions in artifacts.items():
            kept[artifact] |= set(versions) & wanted
    for artifact, versions in sorted(artifacts.items()):
        for version in versions:
            entry = VersionFolder(artifact, version)
            (result.keep if version in kept[artifact] else result.delete).append(entry)
    result.bytes_freed = sum(_size(v.path) for v in result.delete)
    return result


def default_tracking_uri(project: Path) -> str | None:
    """``$MLFLOW_TRACKING_URI``, else the project's ``mlflow.db`` when it exists."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    db = project / "mlflow.db"
    return f"sqlite:///{db.resolve().as_posix()}" if db.is_file() else None


def execute(result: PrunePlan) -> None:
    for entry in result.delete:
        shutil.rmtree(entry.path)
        logger.info("Deleted %s", entry.path)


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@click.command("prune")
@click.option("--keep", type=click.IntRange(min=1), default=DEFAULT_KEEP, show_default=True,
              metavar="N", help="newest versions kept per artifact, whatever MLflow says")
@click.option("--yes", is_flag=True, help="delete (without it: only list what would go)")
@click.option("--data-dir", default="data", show_default=True, metavar="DIR",
              type=click.Path(file_okay=False, path_type=Path),
              help="the project's data folder")
@click.option("--tracking-uri", metavar="URI",
              help="MLflow store whose runs keep versions (default: $MLFLOW_TRACKING_URI, else "
                   "sqlite:///mlflow.db when ./mlflow.db exists)")
def prune(keep: int, yes: bool, data_dir: Path, tracking_uri: str | None) -> None:
    """Delete old data and model versions that no MLflow run references.

    Keeps the KEEP newest versions of every artifact, every version a FINISHED or RUNNING
    (not deleted) MLflow run names, and whatever those were made from. Lists what would be
    deleted; --yes deletes it.
    """
    if not data_dir.is_dir():
        raise click.BadParameter(f"'{data_dir}' is not a folder", param_hint="--data-dir")
    uri = tracking_uri or default_tracking_uri(Path.cwd())
    if uri is None:
        click.echo("No MLflow store found: only --keep protects versions.", err=True)
    result = plan(data_dir, keep=keep, tracking_uri=uri)
    for entry in result.delete:
        click.echo(f"{'Deleting' if yes else 'Would delete'} {entry.path}")
    if yes:
        execute(result)
    click.echo(
        f"{len(result.delete)} version(s) {'deleted' if yes else 'to delete'} "
        f"({_megabytes(result.bytes_freed)}), {len(result.keep)} kept; {result.runs} MLflow "
        f"run(s) reference {len(result.referenced)} version(s)"
        + ("" if yes or not result.delete else ". Run again with --yes to delete."),
    )
