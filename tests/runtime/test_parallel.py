"""ordered_map: results in input order, a bounded number of items in flight, errors at their
item, lazy with one worker."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from functools import partial

import pytest

from neuroblastoma_cnn.runtime.parallel import cpu_count, ordered_map, resolve_workers


class Source:
    """Items 0..n-1 that count how many were pulled (from any thread)."""

    def __init__(self, n: int):
        self.n, self.pulled = n, 0
        self.lock = threading.Lock()

    def __iter__(self) -> Iterator[int]:
        for i in range(self.n):
            with self.lock:
                self.pulled += 1
            yield i


def slow_square(i: int) -> int:
    time.sleep(random.uniform(0, 0.01))  # finish out of order
    return i * i


@pytest.mark.parametrize("processes", [False, True])
def test_results_come_in_input_order_with_bounded_look_ahead(processes: bool) -> None:
    source = Source(40)
    fn = partial(pow, exp=2) if processes else slow_square  # a picklable task for processes
    results = []
    for result in ordered_map(fn, source, workers=2, processes=processes, max_in_flight=3):
        # pulled and not yet consumed (this result included): at most max_in_flight
        assert source.pulled - len(results) <= 3
        results.append(result)
    assert results == [i * i for i in range(40)]


def test_default_bound_is_twice_the_workers() -> None:
    source = Source(30)
    iterator = ordered_map(slow_square, source, workers=3, processes=False)
    assert source.pulled == 0  # nothing before the first result is asked for
    next(iterator)
    assert source.pulled == 6
    iterator.close()


def test_one_worker_is_lazy_and_in_this_thread() -> None:
    source = Source(5)
    threads = []

    def record(i: int) -> int:
        threads.append(threading.get_ident())
        return i

    iterator = ordered_map(record, source, workers=1)
    assert source.pulled == 0
    assert next(iterator) == 0
    assert source.pulled == 1
    assert list(iterator) == [1, 2, 3, 4]
    assert set(threads) == {threading.get_ident()}


def fails_on_three(i: int) -> int:
    if i == 3:
        raise ValueError(f"bad item {i}")
    return i


def test_an_error_is_raised_at_its_item() -> None:
    got = []
    with pytest.raises(ValueError, match="bad item 3"):
        for result in ordered_map(fails_on_three, range(10), workers=2, processes=False):
            got.append(result)
    assert got == [0, 1, 2]
    got = []
    with pytest.raises(ZeroDivisionError):  # from a worker process
        for result in ordered_map(partial(divmod, 1), [1, 2, 0, 4], workers=2):
            got.append(result)
    assert got == [(1, 0), (0, 1)]


def test_closing_early_stops_the_workers() -> None:
    source = Source(1000)
    iterator = ordered_map(slow_square, source, workers=2, processes=False)
    assert [next(iterator) for _ in range(3)] == [0, 1, 4]
    iterator.close()
    assert source.pulled <= 3 + 4
    assert not [t for t in threading.enumerate() if t.name.startswith("ordered_map")]


def test_zero_workers_means_every_core() -> None:
    assert resolve_workers(0) == cpu_count() >= 1
    assert resolve_workers(3) == 3
