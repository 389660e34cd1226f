"""A run stopped by SIGINT or SIGTERM ends as an error the run's hooks see, not as a killed
process that leaves its records half-written.

Why: Python's default SIGTERM kills the process without running any ``finally`` or hook, and
its default SIGINT raises ``KeyboardInterrupt``, which Kedro does not treat as a pipeline error:
either way the MLflow run stays RUNNING for ever. While a run is watched (:func:`watching`), both
signals raise :class:`RunStopped` (an ``Exception``) in the main thread instead, with the stage
the run had reached; the pipeline-error hooks then close the run. A second signal falls back to
the default behaviour, so a stuck clean-up can still be interrupted.

Work that must not be cut in half (promoting and registering a model) runs inside
:func:`critical`: a signal arriving there is held and raised when the block ends.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from neuroblastoma_cnn.core.errors import ProjectError

logger = logging.getLogger(__name__)

#: The signals a user or a scheduler stops a run with.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunStopped(ProjectError):
    """The run was stopped by a signal; ``signal_name`` and ``stage`` say which and where."""

    def __init__(self, signal_name: str, stage: str):
        self.signal_name, self.stage = signal_name, stage
        super().__init__(f"Run stopped by {signal_name} during {stage}",
                         hint="its MLflow run is marked KILLED and nothing it was writing was "
                              "promoted; run the same command again to start over")


class _Watch:
    """The installed handlers, the stage reached and a signal held by a critical block."""

    def __init__(self) -> None:
        self.stage = "start-up"
        self.previous: dict[int, object] = {}
        self.critical = 0
        self.held: str | None = None
        self.stopped: str | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        self.stopped = name
        for sig in STOP_SIGNALS:  # a second signal is not caught: the user insists
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT
                          else signal.SIG_DFL)
        if self.critical:
            logger.warning("%s received during %s: stopping once it is complete", name,
                           self.stage)
            self.held = name
            return
        raise RunStopped(name, self.stage)


_watch: _Watch | None = None


def watching() -> bool:
    return _watch is not None


def install() -> None:
    """Turns SIGINT and SIGTERM into :class:`RunStopped` (main thread only; elsewhere a
    no-op, since Python delivers signals to the main thread alone)."""
    global _watch  # noqa: PLW0603
    if threading.current_thread() is not threading.main_thread():
        return
    uninstall()
    watch = _Watch()
    for sig in STOP_SIGNALS:
        watch.previous[sig] = signal.signal(sig, watch.handle)
    _watch = watch


def uninstall() -> None:
    """Restores the handlers that were there before :func:`install`."""
    global _watch
    watch, _watch = _watch, None
    if watch is None or threading.current_thread() is not threading.main_thread():
        return
    for sig, handler in watch.previous.items():
        signal.signal(sig, handler)  # type: ignore[arg-type]


def set_stage(stage: str) -> None:
    """Records where the run is (``node 'resnet34.train_model'``), for the stop's report."""
    if _watch is not None:
        _watch.stage = stage


def stop_of(error: BaseException | None) -> RunStopped | None:
    """The stop behind ``error``: itself, or a :class:`RunStopped` it was raised while handling
    (``__context__``) or from (``__cause__``). Why: the signal's exception is raised wherever
    the main thread is, and a library may fail while handling it (Keras' traceback filter
    raises TypeError on a frame without a line number), which would hide the stop."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, RunStopped):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def stopped_by() -> str | None:
    """The signal that stopped the run, if one did."""
    return _watch.stopped if _watch is not None else None


def stage() -> str:
    return _watch.stage if _watch is not None else "start-up"


@contextlib.contextmanager
def critical(what: str) -> Iterator[None]:
    """Holds a stop signal until ``what`` is done, then raises it."""
    watch = _watch
    if watch is None:
        yield
        return
    watch.critical += 1
    try:
        yield
    finally:
        watch.critical -= 1
    if not watch.critical and watch.held:
        held, watch.held = watch.held, None
        raise RunStopped(held, f"{watch.stage} (after {what} completed)")
