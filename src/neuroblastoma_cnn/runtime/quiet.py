"""Quiet, readable output: a run prints what a person needs, and little that looks like a failure.

`install()` runs when the package is imported, which a Kedro command, a notebook or a test does
before TensorFlow, Keras or MLflow are imported. It only sets defaults and filters, each at its
source, and never touches file descriptors, so a native crash or a child process always reaches
the terminal:

- environment defaults: usage telemetry off (Kedro, MLflow: no network calls, so no failed
  attempts offline) and ``TF_CPP_MIN_LOG_LEVEL=2`` (TensorFlow's native INFO and WARNING lines
  hidden once its logging is set up);
- known third-party warnings and log records that a user cannot act on (KNOWN_WARNINGS,
  KNOWN_LOG_RECORDS, each with its reason);
- Keras progress bars inside a pipeline run (:class:`QuietRunHook`); ``conf/logging.yml`` says
  which loggers show what.

What remains: TensorFlow 2.21 writes a few native lines while it is imported, before its log
level applies (the absl "All log messages before absl::InitializeLog()" notice and the oneDNN
notice). They are accepted rather than intercepted: hiding them would mean routing file
descriptor 2 through a filter, which can swallow the output of a crash.

Every environment variable below is only a default: set it to see the original output.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
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
    (r"Support for class-based `config` is deprecated", DeprecationWarning, "",
     "pydantic's notice about kedro-mlflow's configuration classes; not ours to change"),
)

# Warnings raised inside a library's own `catch_warnings()` + `simplefilter(...)`, which
# override any filter set from outside: dropped where warnings are shown instead.
# (message regex, why it is safe to hide)
SHOWN_WARNINGS_DROPPED: tuple[tuple[str, str], ...] = (
    (r"Add type hints to the `predict` method",
     "MLflow's notice about kedro-mlflow's PythonModel class (not ours), raised while the class "
     "is defined"),
    (r"One or more dataset names contain '\.' characters",
     "Kedro's advice against dots in names a user chose; select_model reads each CNN's "
     "namespaced `<model>.cv_predictions`, the cross_validate outputs it reuses"),
)

# Python log records dropped: (logger, message regex, why it is safe to hide).
KNOWN_LOG_RECORDS: tuple[tuple[str, str, str], ...] = (
    ("tensorflow", r"triggered tf\.function retracing",
     "Keras builds one predict function per model object; a run predicts with several (head, "
     "fine-tuned network, the logged model MLflow reloads to validate), which TF's retracing "
     "counter reports although nothing is retraced in a loop"),
    ("optuna.study._optimize",
     r"Trial \d+ failed with parameters: .* because of the following error: RunStopped\(",
     "a study or cross-validation stopped by SIGINT/SIGTERM: Optuna would print the trial's "
     "traceback; the run's own one line says where it stopped and that it is marked KILLED"),
)


class _DropKnownRecords(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self._regex = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self._regex.search(record.getMessage())


def _drop_known_shown_warnings() -> None:
    """Wraps ``warnings.showwarning`` once so that SHOWN_WARNINGS_DROPPED are not printed."""
    previous = warnings.showwarning
    if getattr(previous, "_neuroblastoma_cnn", False):
        return
    regex = re.compile("|".join(f"(?:{p})" for p, _ in SHOWN_WARNINGS_DROPPED))

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
             line: Any = None) -> None:
        if not regex.search(str(message)):
            previous(message, category, filename, lineno, file, line)

    show._neuroblastoma_cnn = True  # type: ignore[attr-defined]
    warnings.showwarning = show


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
    """No Keras progress bars inside a pipeline run (e.g. MLflow validating a logged model by
    predicting its input example).

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

    @hook_impl
    def after_pipeline_run(self) -> None:
        self._end()

    @hook_impl
    def on_pipeline_error(self) -> None:
        self._end()


def install() -> None:
    """Environment defaults, warning and log filters; idempotent, also when the package is
    imported again (`%reload_kedro` drops and re-imports it)."""
    for name, value in ENVIRONMENT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    # kedro_datasets re-adds a "default" filter for Kedro's deprecations when it is imported,
    # ahead of ours: import it first so the filters below take precedence.
    import kedro_datasets  # noqa: F401, PLC0415  (here: its import order matters, see above)

    for message, category, module, _why in KNOWN_WARNINGS:  # an equal filter replaces itself
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    _drop_known_shown_warnings()
    for name, pattern, _why in KNOWN_LOG_RECORDS:
        log = logging.getLogger(name)
        if not any(type(f).__name__ == _DropKnownRecords.__name__ for f in log.filters):
            log.addFilter(_DropKnownRecords(pattern))
