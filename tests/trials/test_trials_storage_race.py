"""Workers that open a new study storage at the same moment all get it: each tries to create
the tables, and the ones that lose that race retry instead of failing the run (seen in CI: a
`kedro run --pipeline=study` failed with 'UNIQUE constraint failed: alembic_version')."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

WORKERS = 4
ROUNDS = 6


def _open(url: str, barrier: object) -> str:
    from neuroblastoma_cnn.trials.engine import open_storage  # noqa: PLC0415

    barrier.wait()  # every worker creates the engine and its tables at once
    try:
        open_storage(url, heartbeat_seconds=60)
    except Exception as exc:  # the test reports what a worker saw
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def test_workers_opening_a_new_storage_together_all_succeed(tmp_path: Path):
    context = mp.get_context("spawn")  # no fork of a process that may hold TensorFlow threads
    with context.Manager() as manager, context.Pool(WORKERS) as pool:
        barrier = manager.Barrier(WORKERS)
        for round_ in range(ROUNDS):  # the race is lost often, not always: several new files
            url = f"sqlite:///{tmp_path / f'optuna{round_}.db'}"
            results = pool.starmap(_open, [(url, barrier)] * WORKERS)
            assert results == ["ok"] * WORKERS, results
