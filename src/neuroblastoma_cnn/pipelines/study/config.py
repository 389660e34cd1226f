"""Study configuration: the `study` parameter block, checked and resolved before any training.

A *study* compares variants of one model's parameters. Each is declared in YAML under
``study.studies.<name>`` (see ``conf/base/parameters_study.yml``): a ``grid`` study lists the
parameter paths it varies (``model.dropout``, ``training.optimizer``...) and their values, or
its variants by name, the baseline and the number of repeats; a ``search`` study declares a
space that TPE samples. Paths are relative to the model's block (``params:<model>``), so the
same study runs on any model that has those parameters.

Everything a user can get wrong here (an unknown study, a path the model does not have, an
empty value list, a baseline that is not a variant) is a :class:`ParameterError` raised by
:func:`resolve_study`, before a single trial starts.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping
from typing import Any

from pydantic import Field, ValidationError

from neuroblastoma_cnn.core.errors import ParameterError
from neuroblastoma_cnn.trials.plan import (
    Dimension,
    Mode,
    Pruner,
    RepeatScheme,
    StrictModel,
    StudyPlan,
    Variant,
    apply_overrides,
    get_path,
)


class StudyDefinition(StrictModel):
    """One entry of ``study.studies``. Keys left out inherit the ``study`` block's value."""

    mode: Mode
    description: str | None = None
    model: str | None = None
    repeats: int | None = Field(default=None, ge=1)
    repeat_scheme: RepeatScheme | None = None
    fixed: dict[str, Any] | None = None
    # grid: either `vary` (every combination of the listed values) or `variants` (named sets)
    vary: dict[str, list[Any]] | None = None
    variants: list[Variant] | None = None
    baseline: str | dict[str, Any] | None = None
    # search
    space: dict[str, Dimension] | None = None
    n_trials: int | None = Field(default=None, ge=1)
    pruner: Pruner | None = None


class StudySettings(StrictModel):
    """The ``study`` parameter block (conf/base/parameters_study.yml)."""

    name: str | None
    storage: str = Field(min_length=1)
    workers: int = Field(ge=0)
    repeats: int = Field(ge=1)
    repeat_scheme: RepeatScheme
    model: str = Field(min_length=1)
    seed: int
    validation_fraction: float = Field(gt=0, lt=1)
    heartbeat_seconds: int = Field(ge=1)
    max_retries: int = Field(ge=0)
    studies: dict[str, StudyDefinition]


# ------------------------------------------------------------------------------- paths


def _check_paths(paths: list[str], params: Mapping[str, Any], model: str, where: str) -> None:
    for path in paths:
        try:
            get_path(params, path)
        except KeyError:
            known = ", ".join(sorted(_leaf_paths(params))) or "none"
            raise ParameterError(
                f"study.studies.{where}: '{path}' is not a parameter of model '{model}'.",
                hint=f"paths are relative to params:{model}; known: {known}",
            ) from None


def _leaf_paths(params: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in params.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.extend(_leaf_paths(value, f"{path}."))
        else:
            out.append(path)
    return out


def format_value(value: Any) -> str:
    """Short, stable text for a value in a variant name: 0.25, 1e-04, adam, true."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def vary_variants(vary: Mapping[str, list[Any]]) -> list[Variant]:
    """Every combination of the listed values, named ``dropout=0.25`` (``a=1,b=2`` for two)."""
    paths = list(vary)
    variants = []
    for values in itertools.product(*(vary[p] for p in paths)):
        name = ",".join(f"{p.split('.')[-1]}={format_value(v)}"
                        for p, v in zip(paths, values, strict=True))
        variants.append(Variant(name=name or "defaults", set=dict(zip(paths, values, strict=True))))
    return variants


# ---------------------------------------------------------------------------- resolving


def parse_settings(study_params: Mapping[str, Any]) -> StudySettings:
    """The ``study`` block, type-checked; any problem is one ParameterError line."""
    try:
        return StudySettings.model_validate(dict(study_params or {}))
    except ValidationError as exc:
        raise ParameterError(f"Invalid study parameters: {_first_error(exc)}",
                             hint="see conf/base/parameters_study.yml") from None


def _first_error(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "study"
        problems.append(f"study.{where}: {err['msg']}")
    return "; ".join(problems)


def resolve_study(
    study_params: Mapping[str, Any], parameters: Mapping[str, Any], name: str | None = None
) -> StudyPlan:
    """Resolves the study named by ``study.name`` (or ``name``) against the model's parameters.

    ``parameters`` holds every Kedro parameter; the model's block is ``parameters[model]`` with
    ``model`` and ``training`` sections. Raises ParameterError for anything that would make a
    trial fail later for a reason the user could have fixed in YAML.
    """
    settings = parse_settings(study_params)
    name = _study_name(settings, name)
    spec = settings.studies[name]
    model = spec.model or settings.model
    model_params = parameters.get(model)
    if not isinstance(model_params, Mapping) or not model_params:
        raise ParameterError(f"study.studies.{name}: model '{model}' has no parameters.",
                             hint="set study.model (or the study's model) to a block of "
                                  "parameters_training.yml such as resnet34")
    fixed = dict(spec.fixed or {})
    _check_paths(list(fixed), model_params, model, f"{name}.fixed")
    base = apply_overrides(model_params, fixed)

    variants: list[Variant] = []
    space: dict[str, Dimension] = {}
    baseline: str | None = None
    if spec.mode == "grid":
        variants = _grid_variants(name, spec, base, model)
        baseline = _baseline(name, spec, variants)
        if spec.space or spec.n_trials or spec.pruner:
            raise ParameterError(f"study.studies.{name}: 'space', 'n_trials' and 'pruner' are "
                                 "for search studies; this one has mode 'grid'.")
    else:
        space = _search_space(name, spec, base, model)

    repeats = 1 if spec.mode == "search" else (spec.repeats or settings.repeats)
    return StudyPlan(
        name=name, mode=spec.mode, model=model, repeats=repeats,
        repeat_scheme=spec.repeat_scheme or settings.repeat_scheme, seed=settings.seed,
        validation_fraction=settings.validation_fraction, storage=settings.storage,
        workers=settings.workers, heartbeat_seconds=settings.heartbeat_seconds,
        max_retries=settings.max_retries, base_params=base, fixed=fixed, variants=variants,
        baseline=baseline, space=space, n_trials=spec.n_trials, pruner=spec.pruner,
    )


def _study_name(settings: StudySettings, name: str | None) -> str:
    """The study to run (``name``, else ``study.name``), refused unless it is defined."""
    name = name or settings.name
    if not name:
        raise ParameterError("No study selected: study.name is empty.",
                             hint=f"run with --params study.name=NAME; NAME one of "
                                  f"{', '.join(sorted(settings.studies))}")
    if name not in settings.studies:
        raise ParameterError(f"Unknown study '{name}'.",
                             hint=f"known studies: {', '.join(sorted(settings.studies))}; "
                                  "add one under study.studies in parameters_study.yml")
    return name


def _search_space(name: str, spec: StudyDefinition, base: Mapping[str, Any],
                  model: str) -> dict[str, Dimension]:
    """A search study's space, checked: no grid keys, a space, ``n_trials`` and a pruner, one
    repeat, and every path a parameter of the model."""
    if spec.vary is not None or spec.variants is not None or spec.baseline is not None:
        raise ParameterError(f"study.studies.{name}: 'vary', 'variants' and 'baseline' are "
                             "for grid studies; this one has mode 'search'.")
    if not spec.space:
        raise ParameterError(f"study.studies.{name}: a search study needs a non-empty "
                             "'space'.")
    if spec.n_trials is None or spec.pruner is None:
        raise ParameterError(f"study.studies.{name}: a search study needs 'n_trials' and "
                             "'pruner'.")
    if spec.repeats not in (None, 1):
        raise ParameterError(f"study.studies.{name}: a search trial runs one repeat; "
                             "remove 'repeats'.")
    _check_paths(list(spec.space), base, model, f"{name}.space")
    return dict(spec.space)


def _grid_variants(name: str, spec: StudyDefinition, base: Mapping[str, Any],
                   model: str) -> list[Variant]:
    if (spec.vary is None) == (spec.variants is None):
        raise ParameterError(f"study.studies.{name}: give either 'vary' (paths and values) or "
                             "'variants' (named parameter sets), not both or neither.")
    if spec.vary is not None:
        for path, values in spec.vary.items():
            if not values:
                raise ParameterError(f"study.studies.{name}.vary: '{path}' has an empty value "
                                     "list.", hint="list at least one value")
            texts = [json.dumps(v, sort_keys=True, default=str) for v in values]
            if len(set(texts)) != len(texts):
                raise ParameterError(f"study.studies.{name}.vary: '{path}' lists a value twice.")
        _check_paths(list(spec.vary), base, model, f"{name}.vary")
        variants = vary_variants(spec.vary)
    else:
        variants = list(spec.variants or [])
        if not variants:
            raise ParameterError(f"study.studies.{name}: 'variants' is an empty list.")
        for v in variants:
            _check_paths(list(v.set), base, model, f"{name}.variants.{v.name}")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ParameterError(f"study.studies.{name}: two variants share a name.")
    return variants


def _baseline(name: str, spec: StudyDefinition, variants: list[Variant]) -> str:
    names = [v.name for v in variants]
    if spec.baseline is None:
        raise ParameterError(f"study.studies.{name}: no 'baseline' variant.",
                             hint=f"one of {', '.join(names)}")
    if isinstance(spec.baseline, str):
        if spec.baseline not in names:
            raise ParameterError(f"study.studies.{name}: baseline '{spec.baseline}' is not one "
                                 "of its variants.", hint=f"one of {', '.join(names)}")
        return spec.baseline
    wanted = dict(spec.baseline)
    for v in variants:
        if set(v.set) == set(wanted) and all(_same(v.set[p], wanted[p]) for p in wanted):
            return v.name
    raise ParameterError(f"study.studies.{name}: baseline {wanted} matches no variant.",
                         hint=f"one of {', '.join(names)}")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b
