"""The command line and what a Kedro run prints or checks before it starts.

``commands`` is the ``neuroblastoma-cnn`` command (predict, prune, study); ``error_display``
prints the project's errors as one line; ``preflight`` checks a run's inputs before any node;
``study_command`` is ``neuroblastoma-cnn study``.

The console script stays ``neuroblastoma_cnn.cli:main`` and Kedro still finds the project's
click group as ``neuroblastoma_cnn.cli.cli``: both are read from ``commands`` when first asked
for, so ``hooks`` can import ``error_display`` and ``preflight`` from here without loading the
commands. Other names of the old ``cli.py`` module still resolve, with a DeprecationWarning.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

#: Names read from ``commands`` without a warning: the entry points.
ENTRY_POINTS = ("cli", "main", "main_group")
_SUBMODULES = ("commands", "error_display", "preflight", "study_command")


def __getattr__(name: str) -> Any:
    if name.startswith("__") or name in _SUBMODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    commands = importlib.import_module(f"{__name__}.commands")
    try:
        value = getattr(commands, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    if name not in ENTRY_POINTS:
        warnings.warn(f"{__name__}.{name} is deprecated: use {commands.__name__}.{name}",
                      DeprecationWarning, stacklevel=2)
    return value
