"""Ordered, bounded parallel map: one file per task on several workers, results in input order.

Why: ingestion and prediction decode one file per task. Using every core must change neither
what is written (results come back in input order, so a tile store is byte-identical to a
one-process run) nor how much memory is used (at most ``max_in_flight`` tasks are submitted and
not yet consumed, however many files there are).

Processes start with ``forkserver`` where the platform has it (``spawn`` otherwise), never
``fork``: the parent may hold TensorFlow, MLflow or Kedro threads, and forking a threaded
process can deadlock a child.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: Set (as defaults) when the package is imported, before scikit-learn loads OpenMP. With the
#: default (active) wait policy, OpenMP threads spin between parallel regions and steal the
#: cores from TensorFlow's threads and other processes: a HistGradientBoosting head of 20
#: iterations on 112 x 2048 features took 18 s on a busy 2-core machine, 1.6 s with PASSIVE.
THREAD_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def install_thread_defaults() -> None:
    """Sets :data:`THREAD_DEFAULTS` where the environment has no value of its own."""
    for name, value in THREAD_DEFAULTS.items():
        os.environ.setdefault(name, value)


def cpu_count() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def resolve_workers(workers: int) -> int:
    """``workers`` as a parameter gives it: 0 means one per CPU core."""
    return cpu_count() if workers == 0 else workers


def _process_pool(workers: int, preload: str | None) -> ProcessPoolExecutor:
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if context.get_start_method() == "forkserver":
        # The main module and the task's module are imported once, in the fork server, rather
        # than in every worker (this only takes effect before the server first starts).
        context.set_forkserver_preload(["__main__", *([preload] if preload else [])])
    return ProcessPoolExecutor(workers, mp_context=context)


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int,
    *,
    processes: bool = True,
    max_in_flight: int | None = None,
) -> Iterator[R]:
    """``fn(item)`` for each item, in order, computed by ``workers`` processes (or threads).

    ``workers <= 1`` runs ``fn`` lazily in this thread: nothing is computed before it is asked
    for. Otherwise at most ``max_in_flight`` (default ``2 * workers``) items are pulled from
    ``items`` and not yet yielded: the next is pulled when the consumer asks for a result. An
    exception in ``fn`` is raised here, at its item. With processes, ``fn`` and the items must
    pickle (a module-level function, or a ``functools.partial`` of one). Close the iterator
    (or exhaust it) to stop the workers.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    limit = max_in_flight or 2 * workers
    if limit < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {limit}")
    pool: Executor = (
        _process_pool(workers, getattr(getattr(fn, "func", fn), "__module__", None))
        if processes else ThreadPoolExecutor(workers, thread_name_prefix="ordered_map")
    )
    source = iter(items)
    pending: deque[Future[R]] = deque()
    try:
        pending.extend(pool.submit(fn, item) for item in itertools.islice(source, limit))
        while pending:
            yield pending.popleft().result()
            pending.extend(pool.submit(fn, item) for item in itertools.islice(source, 1))
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
