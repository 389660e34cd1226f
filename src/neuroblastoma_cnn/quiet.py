"""Quiet, readable output: a run prints what a person needs and nothing that looks like a failure.

`install()` runs when the package is imported, which a Kedro command, a notebook or a test does
before TensorFlow, Keras or MLflow are imported. It silences, each at its source:

- usage telemetry (Kedro, MLflow): no network calls, so no failed attempts offline;
- known third-party warnings and log records that a user cannot act on (KNOWN_WARNINGS,
  KNOWN_LOG_RECORDS, each with its reason);
- TensorFlow's native start-up notices. TF 2.21 writes them through absl before absl is set up,
  so TF_CPP_MIN_LOG_LEVEL no longer hides them: this module applies that level itself to the
  native lines written while TensorFlow is imported and while a pipeline runs;
- Keras progress bars printed by third-party `predict` calls during a pipeline run (MLflow
  validates a logged model by predicting its input example).

Every variable below is only a default: set it in the environment to see the original output
(e.g. TF_CPP_MIN_LOG_LEVEL=0 shows every native line).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from kedro.framework.hooks import hook_impl

ENVIRONMENT_DEFAULTS = {
    "TF_CPP_MIN_LOG_LEVEL": "2",  # native INFO and WARNING lines hidden; ERROR and FATAL kept
    "KEDRO_DISABLE_TELEMETRY": "1",  # set it to an empty value to send Kedro usage data
    "DO_NOT_TRACK": "true",  # MLflow only honours "true"
    "MLFLOW_DISABLE_TELEMETRY": "true",
}

# (message regex, category, module regex, why it is safe to hide)
KNOWN_WARNINGS: tuple[tuple[str, type[Warning], str, str], ...] = (
    (r"Option '--pipeline' is deprecated", Warning, "",
     "`kedro run --pipeline=train_resnet34` is how this project's users run it; Kedro 1.x "
     "still supports it (same as --pipelines), so the notice would only alarm them"),
    (r"register_new_resolver\(\) is deprecated", UserWarning, "",
     "OmegaConf 2.4 deprecates the call Kedro and kedro-mlflow make; nothing to change here"),
    (r"ORJSONResponse is deprecated", UserWarning, "",
     "FastAPI's deprecation of a response class kedro-viz imports; kedro-viz still works"),
    (r"IProgress not found", Warning, "",
     "tqdm's text progress bar instead of a widget in a kernel without ipywidgets"),
    ("", DeprecationWarning, r"mlflow\.store\.",
     "SQLAlchemy deprecations (SADeprecationWarning) inside MLflow's tracking store"),
)

# Python log records dropped: (logger, message regex, why it is safe to hide).
KNOWN_LOG_RECORDS: tuple[tuple[str, str, str], ...] = (
    ("tensorflow", r"triggered tf\.function retracing",
     "Keras builds one predict function per model object; a run predicts with several (head, "
     "fine-tuned network, the logged model MLflow reloads to validate), which TF's retracing "
     "counter reports although nothing is retraced in a loop"),
)


class _DropKnownRecords(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self._regex = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self._regex.search(record.getMessage())


# Native (glog-style) lines: "I0000 00:00:1795630642.938969   13481 port.cc:153] ...".
_NATIVE_LINE = re.compile(rb"^([IWEF])\d{4} \d\d:\d\d:[\d.]+ +\d+ [^\]]+\] ")
_SEVERITY_LEVEL = {b"I": 0, b"W": 1, b"E": 2, b"F": 3}
# Shown once per library when absl was not set up; says nothing about the program.
_ABSL_BANNER = b"WARNING: All log messages before absl::InitializeLog() is called"
# Second line of cpu_feature_guard's INFO notice about CPU instructions.
_CPU_NOTICE_TAIL = b"To enable the following instructions:"
# Harmless native errors: (pattern, why).
KNOWN_NATIVE_ERRORS = (
    (rb"NodeDef mentions attribute use_unbounded_threadpool which is not in the op definition",
     "tf.data's deterministic rewrite of a parallel map (Keras predict on arrays with op "
     "determinism on) copies an attribute the sequential op lacks; TF ignores it"),
)


def _min_native_level() -> int:
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def is_native_noise(line: bytes, min_level: int | None = None) -> bool:
    """Whether a native stderr line is below TF_CPP_MIN_LOG_LEVEL or a known harmless error."""
    level = _min_native_level() if min_level is None else min_level
    if level <= 0:  # TF_CPP_MIN_LOG_LEVEL=0: every native line is shown
        return False
    if line.startswith((_ABSL_BANNER, _CPU_NOTICE_TAIL)):
        return True
    match = _NATIVE_LINE.match(line)
    if match is None:
        return False
    severity = _SEVERITY_LEVEL[match.group(1)]
    if severity < min(level, 3):
        return True
    return severity == 2 and any(re.search(p, line) for p, _ in KNOWN_NATIVE_ERRORS)


class NativeStderrFilter:
    """Routes file descriptor 2 through a pipe and drops native noise lines; reentrant.

    Python's own stderr (tracebacks, warnings) goes through the same descriptor and is passed
    on unchanged, line by line, as soon as it is written.
    """

    def __init__(self) -> None:
        self._depth = 0
        self._lock = threading.Lock()
        self._saved_fd: int | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> NativeStderrFilter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        with self._lock:
            self._depth += 1
            if self._depth > 1:
                return
            try:
                sys.stderr.flush()
                saved = os.dup(2)
                read_fd, write_fd = os.pipe()
                os.dup2(write_fd, 2)
                os.close(write_fd)
            except (OSError, ValueError, AttributeError):  # no usable descriptor 2
                self._depth = 0
                return
            self._saved_fd = saved
            # The pump writes to its own copy: it may outlive stop() if a child holds the pipe.
            self._thread = threading.Thread(
                target=self._pump, args=(read_fd, os.dup(saved)), name="native-stderr-filter",
                daemon=True,
            )
            self._thread.start()

    def stop(self) -> None:
        with self._lock:
            if self._depth == 0:
                return
            self._depth -= 1
            if self._depth > 0 or self._saved_fd is None:
                return
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.stderr.flush()
            os.dup2(self._saved_fd, 2)  # closes the pipe's write end: the pump sees EOF
            if self._thread is not None:
                self._thread.join(timeout=5)  # a child process may still hold the pipe
            os.close(self._saved_fd)
            self._saved_fd, self._thread = None, None

    def close(self) -> None:
        """Ends the filter whatever its depth (at exit, so nothing stays in the pipe)."""
        with self._lock:
            self._depth = min(self._depth, 1)
        self.stop()

    @staticmethod
    def _pump(read_fd: int, out_fd: int) -> None:
        pending = b""
        while True:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not is_native_noise(line))
            # A partial line is passed on at once unless it may be the start of a noise line.
            if pending and not (_NATIVE_LINE.match(pending) or pending[:1] in b"IWEFT"):
                kept, pending = kept + pending, b""
            if kept:
                os.write(out_fd, kept)
        if pending and not is_native_noise(pending):
            os.write(out_fd, pending)
        os.close(read_fd)
        os.close(out_fd)


native_stderr_filter = NativeStderrFilter()


@contextlib.contextmanager
def _dropping_warnings(pattern: str) -> Iterator[None]:
    """Drops warnings whose message matches `pattern` as they are shown.

    For warnings raised inside a library's own `catch_warnings()` + `simplefilter("once")`,
    which overrides any filter set from outside.
    """
    regex = re.compile(pattern)
    previous = warnings.showwarning

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
             line: Any = None) -> None:
        if not regex.search(str(message)):
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


# Module -> what its import is wrapped in.
QUIET_IMPORTS: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]] = {
    # Native start-up notices (oneDNN, CPU instructions, absl banner), written at import.
    "tensorflow": lambda: native_stderr_filter,
    # MLflow's "Add type hints to the `predict` method" notice about kedro-mlflow's PythonModel
    # class (not ours: nothing to change here), raised while the class is defined.
    "kedro_mlflow.mlflow.kedro_pipeline_model": lambda: _dropping_warnings(
        r"Add type hints to the `predict` method"
    ),
}


class _QuietLoader(importlib.abc.Loader):
    """Executes one module's import inside its QUIET_IMPORTS context."""

    def __init__(self, loader: Any, quiet: Callable[[], contextlib.AbstractContextManager[Any]]):
        self._loader = loader
        self._quiet = quiet

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        with self._quiet():
            self._loader.exec_module(module)


class _QuietImports(importlib.abc.MetaPathFinder):
    """Finds the QUIET_IMPORTS modules through the normal finders and wraps their loaders."""

    _busy = False

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in QUIET_IMPORTS or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = _QuietLoader(spec.loader, QUIET_IMPORTS[fullname])
        return spec


def _keras_interactive_logging(enabled: bool | None = None) -> bool | None:
    """Reads (and optionally sets) Keras' interactive logging, if Keras is already imported."""
    keras = sys.modules.get("keras")
    if keras is None or not hasattr(keras, "config"):
        return None
    current = bool(keras.config.is_interactive_logging_enabled())
    if enabled is True:
        keras.config.enable_interactive_logging()
    elif enabled is False:
        keras.config.disable_interactive_logging()
    return current


class QuietRunHook:
    """Filters native noise for the length of a run; no Keras progress bars inside it.

    With interactive logging off, Keras sends progress lines to the `absl` logger at INFO,
    which the logging configuration keeps below the level it shows.
    """

    def __init__(self) -> None:
        self._active = False
        self._restore_keras: bool | None = None

    def _quiet_keras(self) -> None:
        if self._active and self._restore_keras is None:
            self._restore_keras = _keras_interactive_logging(False)

    @hook_impl
    def before_pipeline_run(self) -> None:
        native_stderr_filter.start()
        self._active = True
        self._quiet_keras()

    @hook_impl
    def before_node_run(self) -> None:
        self._quiet_keras()

    @hook_impl
    def before_dataset_saved(self) -> None:
        self._quiet_keras()

    def _end(self) -> None:
        if not self._active:
            return
        self._active = False
        if self._restore_keras:
            _keras_interactive_logging(True)
        self._restore_keras = None
        native_stderr_filter.stop()

    @hook_impl
    def after_pipeline_run(self) -> None:
        self._end()

    @hook_impl
    def on_pipeline_error(self) -> None:
        self._end()


def install() -> None:
    """Environment defaults, warning and log filters, the import filter; idempotent, also when
    the package is imported again (`%reload_kedro` drops and re-imports it)."""
    for name, value in ENVIRONMENT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    # kedro_datasets re-adds a "default" filter for Kedro's deprecations when it is imported,
    # ahead of ours: import it first so the filters below take precedence.
    import kedro_datasets  # noqa: F401

    for message, category, module, _why in KNOWN_WARNINGS:  # an equal filter replaces itself
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    if any(type(finder).__name__ == _QuietImports.__name__ for finder in sys.meta_path):
        return
    for name, pattern, _why in KNOWN_LOG_RECORDS:
        logging.getLogger(name).addFilter(_DropKnownRecords(pattern))
    sys.meta_path.insert(0, _QuietImports())
    atexit.register(native_stderr_filter.close)
