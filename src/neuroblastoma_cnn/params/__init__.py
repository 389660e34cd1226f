"""Typed parameters: one pydantic model per parameter group, checked before any node runs.

Why: a typo (``lerning_rate``), a wrong type or an out-of-range value must stop a run in
seconds, naming the key, the value and what is allowed, instead of being ignored or failing hours
later. Nodes declare these models as the type of their ``params:`` inputs, and Kedro (1.7's
parameter validation) instantiates them from the merged configuration before the first node
runs: an error there starts no node, writes no data and opens no MLflow run.

Every field is required: the defaults live in ``conf/base/parameters_*.yml`` only (the command
line and the tests read them from there with :func:`base_parameters`), so code and YAML cannot
drift apart. Unknown keys are errors (``extra="forbid"``), types are strict (``true`` is not an
integer, ``"5"`` is not a number).

``neuroblastoma_cnn.params`` is the one import: it holds the group table (:data:`GROUPS`,
:data:`MODEL_GROUPS`), :func:`validate_parameters`, the YAML defaults and the MLflow hook, and
re-exports the models, which live by stage in ``data.py`` (ingestion, splitting, augmentation),
``training.py`` (model, training) and ``outputs.py`` (evaluation, predict, cross-validation), on
the base in ``base.py``; the value types they use are ``core.types``.

A package of its own, above ``images`` and ``runtime``: ``IngestionParams`` *is* a
``TilingConfig`` and an ``ImageChecks`` (one set of tiling fields for the YAML and the record).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from kedro.framework.hooks import hook_impl
from pydantic import BaseModel

from neuroblastoma_cnn.core.errors import ParameterError
from neuroblastoma_cnn.params.base import Params, describe
from neuroblastoma_cnn.params.data import (
    AugmentationParams,
    IngestionParams,
    SplittingParams,
)
from neuroblastoma_cnn.params.outputs import (
    ConformalParams,
    CrossValidationParams,
    EnsembleParams,
    EvaluationParams,
    FloorParams,
    HybridParams,
    PredictParams,
    SelectedFloorParams,
    SelectModelParams,
)
from neuroblastoma_cnn.params.training import (
    MONITORS,
    OPTIMIZERS,
    CosineSchedule,
    ExponentialSchedule,
    ModelParams,
    Monitor,
    OnlineAugmentationParams,
    Optimizer,
    PlateauSchedule,
    ResNet34Model,
    ResNet50Model,
    Schedule,
    TrainingParams,
    WarmupCosineSchedule,
)

__all__ = [
    "CONF_BASE",
    "GROUPS",
    "MODEL_GROUPS",
    "MONITORS",
    "OPTIMIZERS",
    "AugmentationParams",
    "ConformalParams",
    "CosineSchedule",
    "CrossValidationParams",
    "EnsembleParams",
    "EvaluationParams",
    "ExponentialSchedule",
    "FloorParams",
    "HybridParams",
    "IngestionParams",
    "ModelParams",
    "Monitor",
    "OnlineAugmentationParams",
    "Optimizer",
    "Params",
    "PlateauSchedule",
    "PredictParams",
    "ResNet34Model",
    "ResNet50Model",
    "Schedule",
    "SelectModelParams",
    "SelectedFloorParams",
    "SplittingParams",
    "TrainingParams",
    "TypedParamsMlflowHook",
    "WarmupCosineSchedule",
    "base_group",
    "base_parameters",
    "describe",
    "validate_parameters",
]

CONF_BASE = Path(__file__).resolve().parents[3] / "conf" / "base"


#: Top-level groups and their models; every ``<model>`` group has ``model`` and ``training``.
GROUPS: dict[str, type[Params]] = {
    "ingestion": IngestionParams,
    "splitting": SplittingParams,
    "augmentation": AugmentationParams,
    "evaluation": EvaluationParams,
    "predict": PredictParams,
    "cross_validation": CrossValidationParams,
    "select_model": SelectModelParams,
}
MODEL_GROUPS: dict[str, Any] = {"model": ModelParams, "training": TrainingParams}


def validate_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Validates every known group in ``parameters`` (all of Kedro's, merged): returns
    ``{key: typed model}`` or raises one :class:`ParameterError` listing every problem.

    Kedro validates the groups the pipelines being run use; this checks them all at once, for a
    pre-flight check or a test of the configuration.
    """
    typed: dict[str, Any] = {}
    problems: list[str] = []
    for key, raw in parameters.items():
        if key in GROUPS:
            checks = [(key, GROUPS[key], raw)]
        elif _is_model_group(raw):
            checks = [(f"{key}.{part}", MODEL_GROUPS[part], raw.get(part))
                      for part in MODEL_GROUPS]
        else:
            continue
        for name, model, value in checks:
            try:
                typed[name] = model.parse(value, name)
            except ParameterError as exc:
                problems.append(str(exc))
    if problems:
        raise ParameterError("; ".join(problems))
    return typed


def _is_model_group(raw: Any) -> bool:
    """``<model>: {model: {architecture: ...}, training: {...}}``, the shape of a model's block."""
    return (isinstance(raw, Mapping) and set(raw) <= set(MODEL_GROUPS)
            and isinstance(raw.get("model"), Mapping) and "architecture" in raw["model"])


# ----------------------------------------------------------------------------- YAML defaults


def base_parameters(conf_dir: str | Path | None = None) -> dict[str, Any]:
    """Every parameter of ``conf/base/parameters*.yml``: the defaults, for the command line,
    notebooks and tests (a Kedro run reads them through its config loader instead)."""
    folder = Path(conf_dir) if conf_dir is not None else CONF_BASE
    merged: dict[str, Any] = {}
    for path in sorted(folder.glob("parameters*.yml")):
        merged.update(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    return merged


def base_group(key: str, conf_dir: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """One group of the base parameters (``"ingestion"``, ``"resnet34.training"``), as a dict
    with ``overrides`` applied."""
    value: Any = base_parameters(conf_dir)
    for part in key.split("."):
        value = value[part]
    return {**value, **overrides}


# ----------------------------------------------------------------------------- MLflow


class TypedParamsMlflowHook:
    """Lets kedro-mlflow log a typed parameter group as its flattened values.

    kedro-mlflow logs the ``params:`` inputs of each node in its ``before_node_run``, flattening
    dicts only, so a pydantic model would be logged as one ``repr`` string. This hook runs first
    and swaps each model for its plain dict *in the copy of the inputs that hooks see* (Kedro
    passes hooks a shallow copy): the node itself still receives the typed model.
    """

    @hook_impl(tryfirst=True)
    def before_node_run(self, inputs: dict[str, Any]) -> None:
        for name, value in list(inputs.items()):
            if name.startswith("params:") and isinstance(value, BaseModel):
                inputs[name] = value.model_dump(mode="json")
