"""The project's own errors reach the user as one line; anything else keeps its traceback."""

from __future__ import annotations

import logging
import sys

import pytest
from IPython.core.interactiveshell import InteractiveShell
from kedro.io.core import DatasetError

from neuroblastoma_cnn.core.errors import DataError, ModelError, ProjectError
from neuroblastoma_cnn.hooks import OneLineErrorsHook, error_display


def _raise_chained() -> None:
    """As Kedro does when a dataset fails: DatasetError raised from the project's error."""
    try:
        raise ModelError("Model file 'm.keras' is not a Keras model", hint="retrain it")
    except ModelError as exc:
        raise DatasetError("Failed while loading data from dataset KerasModelDataset") from exc


def test_user_error_is_found_behind_kedro_wrappers():
    with pytest.raises(DatasetError) as caught:
        _raise_chained()
    found = error_display.user_error(caught.value)
    assert isinstance(found, ModelError)
    assert error_display.one_line(found) == (
        "Error: Model file 'm.keras' is not a Keras model (retrain it)")
    assert error_display.user_error(RuntimeError("bug")) is None
    # A bug raised while handling a project error (implicit context) stays a bug.
    try:
        try:
            raise DataError("no images")
        except DataError:
            raise KeyError("bug in the handler")  # noqa: B904
    except KeyError as exc:
        assert error_display.user_error(exc) is None


def test_excepthook_prints_one_line_and_passes_bugs_on(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *args: seen.append(args))
    error_display.install_excepthook()
    error_display.install_excepthook()  # idempotent: wraps once
    hook = sys.excepthook
    assert not isinstance(hook.wrapped, type(hook))

    error = DataError("No image in 'data/01_raw/images'\n(second line)", hint="put images there")
    hook(DataError, error, None)
    err = capsys.readouterr().err
    assert err == "Error: No image in 'data/01_raw/images' (second line) (put images there)\n"
    assert seen == []

    bug = ZeroDivisionError("division by zero")
    hook(ZeroDivisionError, bug, None)
    assert seen == [(ZeroDivisionError, bug, None)]  # the wrapped hook prints the traceback
    assert capsys.readouterr().err == ""


def test_kedro_failure_records_are_dropped_only_for_project_errors(caplog):
    error_display.install_log_filter()
    node_logger = logging.getLogger("kedro.pipeline.node")
    with caplog.at_level(logging.INFO):
        try:
            raise ProjectError("unknown optimizer 'adamm'")
        except ProjectError:
            node_logger.error("Node %s failed with error: \n%s", "train", "unknown optimizer")
            node_logger.info("still shown: below WARNING")
        try:
            raise RuntimeError("a bug")
        except RuntimeError:
            node_logger.error("Node %s failed with error: \n%s", "train", "a bug")
    messages = [r.getMessage() for r in caplog.records]
    assert "Node train failed with error: \nunknown optimizer" not in messages
    assert "still shown: below WARNING" in messages
    assert "Node train failed with error: \na bug" in messages


def test_ipython_cells_print_project_errors_as_one_line(capsys):
    shell = InteractiveShell.instance()
    try:
        # What the project's hook does when `%load_ext kedro.ipython` creates the context.
        OneLineErrorsHook().after_context_created(context=None)
        shell.run_cell("from neuroblastoma_cnn.core.errors import DataError\n"
                       "raise DataError('No file to classify in data/01_raw/predict', "
                       "hint='put images there')")
        out = capsys.readouterr()
        assert out.err == ("Error: No file to classify in data/01_raw/predict "
                           "(put images there)\n")
        assert "Traceback" not in out.out + out.err

        shell.run_cell("1 / 0")
        out = capsys.readouterr()
        assert "ZeroDivisionError" in out.out + out.err
        assert "Traceback" in out.out + out.err or "----> 1" in out.out + out.err
    finally:
        InteractiveShell.clear_instance()


def test_errors_from_a_reimported_package_are_still_the_projects():
    """`%reload_kedro` re-imports the package: a cell may raise the new classes while the
    handler was built with the old ones (or the other way round)."""
    reimported = type("ProjectError", (Exception,), {
        "__module__": ProjectError.__module__,
        "one_line": lambda self: f"{self} (hint)"})
    data_error = type("DataError", (reimported,), {"__module__": ProjectError.__module__})
    error = data_error("no images")
    assert error_display.user_error(error) is error
    assert error_display.one_line(error) == "Error: no images (hint)"
    lookalike = type("ProjectError", (Exception,), {"__module__": "somewhere.else"})
    assert error_display.user_error(lookalike("x")) is None
