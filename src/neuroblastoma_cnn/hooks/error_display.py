"""How the project's own errors reach the user: one line in `kedro run`, the CLI and notebooks.

A :class:`~neuroblastoma_cnn.core.errors.ProjectError` is something the user can fix (a parameter, a
missing folder, data from two lineages), so its traceback only hides the one useful line. Any
other exception is a bug and keeps its full traceback.

Why through ``sys.excepthook``, a logging filter and IPython's custom exception handler, set up by
``hooks.OneLineErrorsHook``: `kedro run` lets the exception leave ``KedroCLI.main`` and prints it
with the excepthook rich installs when Kedro configures logging; the hook wraps that excepthook
(after logging is configured) rather than editing Kedro. Kedro also logs a failing node's message
and a "resume from" suggestion before re-raising; for a project error those say nothing the one
line does not, so a filter drops them, judging by the exception being handled when they are
logged.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any

from kedro.validation.exceptions import ParameterValidationError

from neuroblastoma_cnn.core.errors import ProjectError
from neuroblastoma_cnn.runtime import stopping

# Kedro loggers that report a failing node before the exception is re-raised.
KEDRO_FAILURE_LOGGERS = (
    "kedro.pipeline.node",
    "kedro.runner.runner",
    "kedro.runner.sequential_runner",
    "kedro.runner.thread_runner",
    "kedro.runner.parallel_runner",
)
PREFIX = "Error"


def user_error(error: BaseException | None) -> BaseException | None:
    """The user-fixable error behind ``error``, if any: a ProjectError, or Kedro's parameter
    validation error, found on ``error`` or the exceptions it was raised from (Kedro wraps a
    dataset's error in a DatasetError ``from`` it); or the stop signal's ``RunStopped`` that
    another library's error hid (``runtime.stopping.stop_of``)."""
    original, seen = error, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if is_project_error(error) or _is_parameter_validation_error(error):
            return error
        error = error.__cause__
    return stopping.stop_of(original)  # a stop signal another library's error hid


def is_project_error(error: BaseException) -> bool:
    """A ProjectError, also one whose class comes from an earlier import of this package
    (``%reload_kedro`` re-imports it in a notebook: old and new classes then coexist)."""
    return isinstance(error, ProjectError) or any(
        cls.__name__ == ProjectError.__name__ and cls.__module__ == ProjectError.__module__
        for cls in type(error).__mro__)


def _is_parameter_validation_error(error: BaseException) -> bool:
    return isinstance(error, ParameterValidationError)


def _squashed(error: BaseException) -> str:
    if is_project_error(error):
        return error.one_line()
    return "; ".join(line.strip(" -") for line in str(error).splitlines() if line.strip())


def one_line(error: BaseException) -> str:
    """``Error: <message> (<hint>)`` on a single line."""
    return f"{PREFIX}: {_squashed(error)}"


def reason(error: BaseException) -> str:
    """Why a run failed, in one line: a user error's message, else ``<Type>: <message>``."""
    found = user_error(error)
    if found is not None:
        return _squashed(found)
    return f"{type(error).__name__}: {_squashed(error)}"


ExceptHook = Callable[[type[BaseException], BaseException, TracebackType | None], Any]


class _OneLineExceptHook:
    """Prints a user error as one line; hands anything else to the hook it wraps."""

    def __init__(self, wrapped: ExceptHook) -> None:
        self.wrapped = wrapped

    def __call__(self, etype: type[BaseException], value: BaseException,
                 tb: TracebackType | None) -> Any:
        error = user_error(value)
        if error is None:
            return self.wrapped(etype, value, tb)
        print(one_line(error), file=sys.stderr, flush=True)
        return None


def install_excepthook() -> None:
    """Wraps the current ``sys.excepthook`` (rich's, under Kedro) once; idempotent."""
    if not isinstance(sys.excepthook, _OneLineExceptHook):
        sys.excepthook = _OneLineExceptHook(sys.excepthook)


class DropKedroFailureRecords(logging.Filter):
    """Drops Kedro's failure records logged while a user error is being handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        return user_error(sys.exc_info()[1]) is None


_FILTER = DropKedroFailureRecords()


def install_log_filter() -> None:
    for name in KEDRO_FAILURE_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def _ipython_handler(shell: Any, etype: type[BaseException], value: BaseException,
                     tb: TracebackType | None, tb_offset: int | None = None) -> Any:
    error = user_error(value)
    if error is None:
        return shell.showtraceback((etype, value, tb), tb_offset=tb_offset)
    print(one_line(error), file=sys.stderr, flush=True)
    return None


def install_ipython_handler() -> bool:
    """In an IPython kernel or shell, prints user errors of any cell as one line (idempotent);
    returns whether IPython was found."""
    ipython = sys.modules.get("IPython")  # never imported here: only a running shell matters
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None:
        return False
    if getattr(shell, "CustomTB", None) is not None and getattr(
            shell.CustomTB, "__func__", None) is _ipython_handler:
        return True
    shell.set_custom_exc((Exception,), _ipython_handler)
    return True


def install() -> None:
    """Everything above: excepthook, Kedro log filter, IPython handler."""
    install_excepthook()
    install_log_filter()
    install_ipython_handler()
