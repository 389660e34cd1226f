"""Old module paths (before the shared modules moved into sub-packages) keep working for one
release, with a DeprecationWarning naming the new path.

One meta path finder maps each old dotted name to its new module: ``import
neuroblastoma_cnn.imaging``, ``from neuroblastoma_cnn.params import PredictParams`` and ``from
neuroblastoma_cnn import stain`` all get the *same* module object as the new path (so classes,
``isinstance`` and monkeypatching agree), and pickles or cloudpickled MLflow models that name a
class by its old module load too. No file is kept per old name. The warning is given once per
process: the alias then sits in ``sys.modules``.

Remove the aliases (this module and its ``install()`` in ``__init__.py``) in the release after
next; ``tests/core/test_compat.py`` lists what they must cover until then.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

PACKAGE = __name__.rpartition(".")[0]

#: Old module (under the package) -> its new home.
MOVED: dict[str, str] = {
    "errors": "core.errors",
    "params": "core.params",
    "preprocessing": "core.preprocessing",
    "storage": "core.storage",
    "imaging": "images.decoding",
    "slides": "images.slides",
    "stain": "images.stain",
    "online_augmentation": "images.online_augmentation",
    "tf_input": "images.tf_input",
    "sampling": "images.sampling",
    "distribution": "runtime.distribution",
    "parallel": "runtime.parallel",
    "quiet": "runtime.quiet",
    "calibration": "analysis.calibration",
    "metrics": "analysis.metrics",
    "predictions": "analysis.predictions",
    "gradcam": "analysis.gradcam",
    "lineage": "tracking.lineage",
    "promotion": "tracking.promotion",
    "prune": "tracking.prune",
    "privacy": "tracking.privacy",
    "registry": "tracking.registry",
    "error_display": "hooks.error_display",
    "preflight": "hooks.preflight",
    "study_command": "cli.study_command",
    # cli.py became the package cli/: its entry points stay at neuroblastoma_cnn.cli (see there).
}
ALIASES: dict[str, str] = {f"{PACKAGE}.{old}": f"{PACKAGE}.{new}" for old, new in MOVED.items()}


class _AliasLoader(importlib.abc.Loader):
    """Hands over the new module itself (imported if need be) under the old name."""

    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(f"{spec.name} is deprecated and will be removed in the next release: "
                      f"import {self.new}", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(self.new)
        self._spec = module.__spec__  # the import system overwrites it with the alias's spec
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._spec  # the module stays what it is, under its new name


class AliasFinder(importlib.abc.MetaPathFinder):
    """Finds the old module names, and only those."""

    def find_spec(self, fullname: str, path: object = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        new = ALIASES.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new))


def install() -> None:
    """Puts the finder on ``sys.meta_path`` once (a re-imported package does not add another)."""
    if not any(type(finder).__name__ == AliasFinder.__name__
               and type(finder).__module__ == __name__ for finder in sys.meta_path):
        sys.meta_path.append(AliasFinder())
