"""SIGINT and SIGTERM become ``RunStopped`` with the stage reached while a run is watched; a
critical block holds the signal until it is done; the previous handlers come back."""

from __future__ import annotations

import os
import signal

import pytest

from neuroblastoma_cnn.runtime import stopping


@pytest.fixture(autouse=True)
def _restore():
    before = {s: signal.getsignal(s) for s in stopping.STOP_SIGNALS}
    yield
    stopping.uninstall()
    assert {s: signal.getsignal(s) for s in stopping.STOP_SIGNALS} == before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_run_at_its_stage(sig):
    stopping.install()
    stopping.set_stage("node 'a.train'")
    with pytest.raises(stopping.RunStopped) as caught:
        os.kill(os.getpid(), sig)
        for _ in range(1000):  # the handler runs at the next bytecode
            pass
    assert (caught.value.signal_name, caught.value.stage) == (sig.name, "node 'a.train'")
    assert caught.value.one_line().startswith(f"Run stopped by {sig.name} during node 'a.train'")
    assert stopping.stopped_by() == sig.name


def test_a_critical_block_finishes_before_the_stop():
    stopping.install()
    stopping.set_stage("node 'a.evaluate'")
    done = []
    with pytest.raises(stopping.RunStopped, match="after promoting a completed"), \
            stopping.critical("promoting a"):
        os.kill(os.getpid(), signal.SIGTERM)
        done.append("promoted")
    assert done == ["promoted"]


def test_unwatched_runs_keep_the_default_handlers():
    with stopping.critical("anything"):
        pass
    assert not stopping.watching() and stopping.stage() == "start-up"


def test_a_stop_hidden_by_a_library_error_is_still_found():
    """Keras' traceback filter raises TypeError while handling a stop raised inside fit: the
    stop is found behind it (by the stop hook, which marks the run KILLED, and by the one-line
    error display)."""
    from neuroblastoma_cnn.hooks.error_display import user_error  # noqa: PLC0415

    stop = stopping.RunStopped("SIGINT", "node 'a.train'")
    try:
        try:
            raise stop
        except stopping.RunStopped:
            raise TypeError("'NoneType' object cannot be interpreted as an integer")  # noqa: B904
    except TypeError as hidden:
        assert stopping.stop_of(hidden) is stop
        assert user_error(hidden) is stop
    assert stopping.stop_of(ValueError("a bug")) is None
    assert user_error(ValueError("a bug")) is None
