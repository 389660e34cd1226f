"""Runs left RUNNING by a process that is gone (SIGKILL, power cut) are found and marked
KILLED, with their children; runs of a live process or another host are left alone."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import pytest

from neuroblastoma_cnn.tracking import interrupted


@pytest.fixture
def client(tmp_path):
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _run(client, experiment: str, tags: dict[str, str], parent: str | None = None) -> str:
    extra = {interrupted.PARENT_TAG: parent} if parent else {}
    return client.create_run(experiment, tags={**tags, **extra}).info.run_id


def test_orphans_and_their_children_are_marked_killed(client):
    experiment = client.create_experiment("e")
    dead = interrupted.process_tags(_dead_pid())
    dead[interrupted.START_TAG] = "1"  # whatever it was, the pid no longer runs
    orphan = _run(client, experiment, dead)
    child = _run(client, experiment, {}, parent=orphan)
    alive = _run(client, experiment, interrupted.process_tags())
    elsewhere = _run(client, experiment, {**dead, interrupted.HOST_TAG: "another-host"})
    unowned = _run(client, experiment, {})
    reused = _run(client, experiment, {**interrupted.process_tags(),
                                       interrupted.START_TAG: "12345"})  # pid reused since
    rebooted = _run(client, experiment, {**interrupted.process_tags(),
                                         interrupted.BOOT_TAG: "an-older-boot"})
    current = _run(client, experiment, dead)

    marked = interrupted.mark_orphans(client, [experiment], found_by=current)

    assert set(marked) == {orphan, child, reused, rebooted}
    status = {r: client.get_run(r).info.status for r in
              (orphan, child, alive, elsewhere, unowned, reused, rebooted, current)}
    assert [status[r] for r in (orphan, child, reused, rebooted)] == ["KILLED"] * 4
    assert [status[r] for r in (alive, elsewhere, unowned, current)] == ["RUNNING"] * 4
    reason = client.get_run(orphan).data.tags[interrupted.KILLED_TAG]
    assert reason.startswith(f"process {dead[interrupted.PID_TAG]} on ")
    assert f"found by run {current}" in reason
    assert client.get_run(child).data.tags[interrupted.KILLED_TAG].startswith("its parent run:")


def test_a_stopped_run_is_killed_with_its_stage(client):
    experiment = client.create_experiment("e")
    run = _run(client, experiment, interrupted.process_tags())
    child = _run(client, experiment, {}, parent=run)
    ended = interrupted.mark_killed(client, run, "stopped by SIGTERM", "node 'a.train'")
    assert ended == [child, run]
    tags = client.get_run(run).data.tags
    assert client.get_run(run).info.status == "KILLED"
    assert tags[interrupted.STAGE_TAG] == "node 'a.train'"
    assert tags[interrupted.KILLED_TAG] == "stopped by SIGTERM"
    assert client.get_run(child).info.status == "KILLED"
