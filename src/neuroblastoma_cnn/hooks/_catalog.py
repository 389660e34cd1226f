"""What several hooks read from Kedro's catalog."""

from __future__ import annotations

from typing import Any


def catalog_datasets(catalog: Any, names: Any) -> dict[str, Any]:
    """The catalog's datasets for ``names`` (patterns materialised), skipping parameters."""
    found = {}
    for name in sorted(names):
        if name.startswith("params:") or name == "parameters":
            continue
        try:
            dataset = catalog.get(name)
        except Exception:  # a name the catalog cannot build is Kedro's to report
            dataset = None
        if dataset is not None:
            found[name] = dataset
    return found
