"""What a set of trials runs: a study's variants (or search space) on its repeats, as the
trials engine reads it. A study (``pipelines/study``) resolves it from its YAML; a
cross-validation (``pipelines/cross_validation``) makes one of one variant with a repeat per
fold.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from neuroblastoma_cnn.core.errors import ParameterError

Mode = Literal["grid", "search"]
# How a study's repeats are formed; the test split always stays the split table's own.
#   folds:  repeat r validates on cross-validation fold r and trains on the other folds
#   seeded: repeat r validates on a seeded, class-stratified draw of the non-test patients
#   split:  every repeat uses the split table as it is; only the training seed changes
RepeatScheme = Literal["folds", "seeded", "split"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Variant(StrictModel):
    """One named set of parameter values applied on top of the model's parameters."""

    name: str = Field(min_length=1)
    set: dict[str, Any]


class Dimension(StrictModel):
    """One dimension of a search space. Absent ``log`` / ``step`` mean a linear, continuous
    range; ``choices`` is for categoricals only."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> Dimension:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical dimension needs a non-empty 'choices' list")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} dimension needs 'low' and 'high'")
        if not self.low < self.high:
            raise ValueError(f"'low' ({self.low}) must be below 'high' ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs 'low' > 0")
        return self


class Pruner(StrictModel):
    """Median pruning on per-epoch validation macro-F1 (Optuna's MedianPruner)."""

    n_startup_trials: int = Field(ge=0)
    n_warmup_steps: int = Field(ge=0)


class StudyPlan(StrictModel):
    """A study resolved against the model's parameters: what the trials will run.

    ``variants`` is empty for a search; ``base_params`` is the model's block with ``fixed``
    applied, and each variant's ``set`` goes on top of it.
    """

    name: str
    mode: Mode
    model: str
    repeats: int
    repeat_scheme: RepeatScheme
    seed: int
    validation_fraction: float
    storage: str
    workers: int
    heartbeat_seconds: int
    max_retries: int
    base_params: dict[str, Any]
    fixed: dict[str, Any]
    variants: list[Variant]
    baseline: str | None
    space: dict[str, Dimension]
    n_trials: int | None
    pruner: Pruner | None

    @property
    def variant_names(self) -> list[str]:
        return [v.name for v in self.variants]

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise ParameterError(f"Study '{self.name}' has no variant '{name}'.")

    def params_for(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """The model's parameters with ``overrides`` ({path: value}) applied."""
        return apply_overrides(self.base_params, overrides)

    def definition_hash(self, data_fingerprint: str = "") -> str:
        """A short hash of what the trials compute: same hash, same study (safe to resume)."""
        keys = ("name", "mode", "model", "repeats", "repeat_scheme", "seed",
                "validation_fraction", "base_params", "variants", "space", "n_trials", "pruner")
        payload = json.dumps(
            {**self.model_dump(include=set(keys), mode="json"), "data": data_fingerprint},
            sort_keys=True, default=str,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:10]


def get_path(params: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path such as ``training.optimizer``; KeyError when absent."""
    node: Any = params
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


def apply_overrides(params: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``params`` with each dotted path set to its value (paths must exist)."""
    out = copy.deepcopy(dict(params))
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = out
        for part in parents:
            node = node[part]
        node[leaf] = copy.deepcopy(value)
    return out
