"""The base of every parameter model (:class:`Params`: strict, frozen, no unknown key) and the
one-line error messages (:func:`describe`), shared by the parameter groups (``data.py``,
``training.py``, ``outputs.py``).

Import the models from :mod:`neuroblastoma_cnn.params`, which re-exports these.
"""

from __future__ import annotations

import difflib
import functools
import typing
from collections.abc import Collection, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from neuroblastoma_cnn.core.errors import ParameterError


class Params(BaseModel):
    """Base of the parameter groups: strict, frozen, no unknown key; errors in one line."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @classmethod
    def parse(cls, raw: Any, key: str) -> Any:
        """Validates ``raw`` as the group ``key`` (e.g. ``resnet34.training``); raises
        :class:`ParameterError` with one line per problem naming ``key.field``."""
        try:
            return cls.__pydantic_validator__.validate_python(raw)
        except ValidationError as exc:
            raise ParameterError(describe(exc, key, cls)) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Any:
        """What Kedro's parameter validation calls (it does not pass the key; it names the
        group itself): the same one-line problems as :meth:`parse`, fields named from the group."""
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as exc:
            raise ParameterError(describe(exc, "", cls)) from None


# ----------------------------------------------------------------------------- messages


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
           "less_than_equal": "<="}
_BOUND_CTX = {"greater_than": "gt", "greater_than_equal": "ge", "less_than": "lt",
              "less_than_equal": "le"}


def describe(exc: ValidationError, key: str, model: type[BaseModel] | None,
             tags: Collection[str] | None = None) -> str:
    """One line per problem, joined by '; ': ``key.field = value: what is allowed``. ``tags``:
    the discriminated unions' tags, left out of the names (default: those under ``model``)."""
    tags = union_tags(model) if tags is None else tags
    lines = []
    for error in exc.errors(include_url=False):
        loc = [str(p) for p in error["loc"] if not _is_union_tag(p, error, tags)]
        where = ".".join([key, *loc] if key else loc)
        kind = error["type"]
        if kind == "missing":
            lines.append(f"{where}: missing (every key is required, the defaults are in "
                         "conf/base/parameters_*.yml)")
            continue
        value = f" = {error['input']!r}"
        if kind == "union_tag_invalid":  # e.g. architecture: vgg, schedule type: triangle
            ctx = error.get("ctx", {})
            field = str(ctx.get("discriminator", "type")).strip("'")
            lines.append(f"{'.'.join([where, field]) if where else field} = {ctx.get('tag')!r}: "
                         f"must be one of {ctx.get('expected_tags')}")
        elif kind == "extra_forbidden":
            known = _known_keys(model, loc[:-1])
            close = difflib.get_close_matches(loc[-1], known, n=1) if known else []
            hint = f", did you mean '{close[0]}'?" if close else ""
            allowed = f" (known keys: {', '.join(known)})" if known else ""
            lines.append(f"{where}{value}: unknown key{hint}{allowed}")
        elif kind in _BOUNDS:
            bound = error.get("ctx", {}).get(_BOUND_CTX[kind])
            lines.append(f"{where}{value}: must be {_BOUNDS[kind]} {bound}")
        elif kind == "value_error" and not loc:
            message = error["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {message}" if key else message)
        else:
            message = error["msg"].removeprefix("Value error, ")
            message = message.replace("Input should be", "must be").replace(
                "Input tag", "type").replace("Input", "value")
            lines.append(f"{where}{value}: {message}")
    return "; ".join(lines)


def _is_union_tag(part: Any, error: Mapping[str, Any], tags: Collection[str]) -> bool:
    """Discriminated unions add the tag (e.g. 'exponential', 'resnet50') to an error's loc."""
    return isinstance(part, str) and part in tags and part != error["loc"][-1]


@functools.cache
def union_tags(model: Any) -> frozenset[str]:
    """The tags of the unions of models under ``model`` (a schedule's ``cosine``, a model's
    ``resnet50``): each member's one-valued ``Literal`` field, read from the models themselves."""
    tags: set[str] = set()
    seen: set[type] = set()

    def visit(annotation: Any) -> None:
        args = typing.get_args(annotation)
        members = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        for member in members if len(members) > 1 else []:
            for field in member.model_fields.values():
                choices = typing.get_args(field.annotation)
                if typing.get_origin(field.annotation) is typing.Literal and len(choices) == 1:
                    tags.add(str(choices[0]))
        for arg in args:
            visit(arg)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and (
                annotation not in seen):
            seen.add(annotation)
            for field in annotation.model_fields.values():
                visit(field.annotation)

    visit(model)
    return frozenset(tags)


def _known_keys(model: type[BaseModel] | None, path: list[str]) -> list[str]:
    if model is None or path:
        return []
    return list(model.model_fields)

