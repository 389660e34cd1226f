"""The MLflow Model Registry: every promoted model as a version of ``<experiment>-<architecture>``,
and the alias ``champion`` on the best one the promotion rules allow.

Why: a run's logged model is found by its run; people (and ``predict -m
models:/<name>@champion``) want "the current best ResNet34" without looking up a run. Each
version carries the run's key test metrics as tags, so the registry UI compares versions at a
glance. ``champion`` moves to a new version only when the promotion rules allow it (the model
was trained and evaluated, and did not fail the did-it-learn checks) *and* its test macro-F1 is
not worse than the current champion's; otherwise it stays where it was (a version without the
metric never takes it).

MLflow keeps the registry in the tracking store (``registry_uri`` = the SQLite tracking URI).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

CHAMPION = "champion"
#: The tag ``champion`` is decided on, and the other key metrics tagged on each version.
DECIDING_TAG = "test_f1_macro"
_KEY_METRICS = {"test_f1_macro": ("f1_macro",), "test_f1_macro_low": ("macro_f1_ci", "low"),
                "test_f1_macro_high": ("macro_f1_ci", "high"), "test_accuracy": ("accuracy",),
                "test_balanced_accuracy": ("balanced_accuracy",),
                "test_n_images": ("n_test_images",), "test_n_groups": ("n_test_groups",),
                "test_ece_before": ("calibration", "ece_before"),
                "test_ece_after": ("calibration", "ece_after"),
                "temperature": ("calibration", "temperature")}


def registered_name(experiment: str, architecture: str) -> str:
    """``neuroblastoma_cnn-resnet34``: one registered model per experiment and architecture."""
    return f"{experiment}-{architecture}"


def key_metric_tags(test_metrics: Mapping[str, Any] | None) -> dict[str, str]:
    """The run's key test metrics as version tags (strings; absent metrics left out)."""
    tags = {}
    for tag, path in _KEY_METRICS.items():
        value: Any = test_metrics or {}
        for part in path:
            value = value.get(part) if isinstance(value, Mapping) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            tags[tag] = f"{value:.6g}"
    return tags


def _score(tags: Mapping[str, str]) -> float | None:
    try:
        value = float(tags[DECIDING_TAG])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def should_take_champion(new_tags: Mapping[str, str], champion_tags: Mapping[str, str] | None,
                         allowed: bool) -> bool:
    """Whether the new version becomes ``champion``: allowed by the promotion rules, has a test
    macro-F1, and it is not worse than the current champion's (no champion: yes)."""
    new = _score(new_tags)
    if not allowed or new is None:
        return False
    if champion_tags is None:
        return True
    old = _score(champion_tags)
    return old is None or new >= old


def _champion(client: Any, name: str) -> Any:
    from mlflow.exceptions import MlflowException  # noqa: PLC0415  (lazy: MLflow)

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def register_version(model_uri: str, name: str, test_metrics: Mapping[str, Any] | None,
                     allowed: bool, run_id: str | None = None) -> tuple[str, bool]:
    """Registers ``model_uri`` as a new version of ``name`` with the key metrics as tags, and
    moves ``champion`` to it when :func:`should_take_champion`; returns (version, champion)."""
    import mlflow  # noqa: PLC0415  (lazy: MLflow loads only when a model is registered)

    client = mlflow.MlflowClient()
    tags = key_metric_tags(test_metrics)
    if run_id:
        tags["run_id"] = run_id
    version = mlflow.register_model(model_uri, name, tags=tags).version
    current = _champion(client, name)
    take = should_take_champion(tags, None if current is None else current.tags, allowed)
    if take:
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "champion_at_registration",
                                 "yes" if take else "no")
    logger.info("Registered %s version %s (test macro-F1 %s)%s", name, version,
                tags.get(DECIDING_TAG, "n/a"),
                f"; now models:/{name}@{CHAMPION}" if take else
                f"; {CHAMPION} stays version {current.version}" if current else
                f"; not {CHAMPION} (not allowed by the promotion rules)")
    return str(version), take
