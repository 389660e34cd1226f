"""MLflow runs that end truthfully: which process owns a run, and runs marked KILLED when
their process was stopped or is gone.

Why: an MLflow run is RUNNING until someone ends it; a process killed outright (SIGKILL, a power
cut, an out-of-memory kill) never does, and its run stays RUNNING for ever, indistinguishable
from one still training. Each run records the process that owns it (host, pid, the process's
start time and the machine's boot id, so a pid reused later or after a reboot is not taken for
the owner); the next run started on that host marks RUNNING runs whose owner is gone KILLED,
with a tag saying so.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

HOST_TAG = "process.host"
PID_TAG = "process.pid"
START_TAG = "process.start"
BOOT_TAG = "process.boot_id"
#: Why a run was marked KILLED (by a stop signal, or found orphaned later).
KILLED_TAG = "killed_reason"
#: The stage (node) a stopped run had reached.
STAGE_TAG = "stopped_at"
PARENT_TAG = "mlflow.parentRunId"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), '' elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[19]  # field 22, counted after the command name


def process_tags(pid: int | None = None) -> dict[str, str]:
    """The tags that name this process (or ``pid``) as a run's owner."""
    pid = os.getpid() if pid is None else pid
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(pid), START_TAG: _start_ticks(pid),
            BOOT_TAG: _boot_id()}


def owner_alive(tags: dict[str, str]) -> bool | None:
    """Whether the process a run's tags name still runs: None when it cannot be told here
    (another host, or no owner recorded)."""
    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
        return None
    if tags.get(BOOT_TAG) and _boot_id() and tags[BOOT_TAG] != _boot_id():
        return False  # the machine restarted since: a power cut
    pid = int(tags[PID_TAG])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    started = _start_ticks(pid)
    return not (tags.get(START_TAG) and started and started != tags[START_TAG])


def mark_killed(client: Any, run_id: str, reason: str, stage: str | None = None) -> list[str]:
    """Ends a run and its RUNNING descendants KILLED with the reason (and the stage it
    reached); returns the run ids ended."""
    from mlflow.entities import RunStatus  # noqa: PLC0415

    run = client.get_run(run_id)
    ended = []
    for child in client.search_runs(
            [run.info.experiment_id], f"tags.`{PARENT_TAG}` = '{run_id}'"):
        if child.info.status == "RUNNING":
            ended += mark_killed(client, child.info.run_id, f"its parent run: {reason}", stage)
    client.set_tag(run_id, KILLED_TAG, reason)
    if stage:
        client.set_tag(run_id, STAGE_TAG, stage)
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
    return [*ended, run_id]


def mark_orphans(client: Any, experiment_ids: list[str], found_by: str) -> list[str]:
    """Marks KILLED the RUNNING runs of these experiments whose owner process on this host is
    gone; returns their ids. Runs of other hosts, or without an owner, are left alone."""
    orphans: list[str] = []
    for run in client.search_runs(experiment_ids, "attributes.status = 'RUNNING'",
                                  max_results=1000):
        if run.info.run_id in (found_by, *orphans) or owner_alive(run.data.tags) is not False:
            continue
        tags = run.data.tags
        when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        reason = (f"process {tags[PID_TAG]} on {tags[HOST_TAG]} ended without closing the run "
                  f"(killed or power cut); found by run {found_by} at {when}")
        orphans += mark_killed(client, run.info.run_id, reason)
        logger.warning("MLflow run %s was left RUNNING by a process that is gone: marked "
                       "KILLED", run.info.run_id)
    return orphans
