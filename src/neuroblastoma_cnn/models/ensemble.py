"""Fold ensembles: several trained models of one task averaged into one Keras model.

Why one Keras model rather than a list: everything downstream (``save_keras_model`` /
``load_keras_model``, the predict pipeline, the CLI, Grad-CAM, MLflow logging) takes "a model";
an ensemble built here is used exactly like a single trained network. Its output is the weighted
mean of the members' class probabilities, computed by :class:`WeightedMean` (a registered layer,
so the ``.keras`` file loads without ``custom_objects`` once :mod:`neuroblastoma_cnn.models` is
imported, which ``load_keras_model`` does).

Members are refused *before* building (:func:`check_members`) unless they were preprocessed
alike: averaging probabilities of models that saw different classes, tile sizes or stain
normalisation would silently mix incompatible inputs. The ensemble carries their common
preprocessing record. The record format forbids unknown keys (``Preprocessing`` is
``extra="forbid"``), so older readers would refuse an "ensemble" field: an ensemble is
recognised by its output layer's type instead (:func:`is_ensemble`).

The ensemble shares the members' layers (no weights are copied); each member is wrapped in a
functional model named ``member_<i>`` so that two members of the same architecture (both named
``resnet34``) can live in one graph.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import keras

from neuroblastoma_cnn.core.errors import ModelError, ParameterError
from neuroblastoma_cnn.images.preprocessing import (
    Preprocessing,
    attach_preprocessing,
    preprocessing_of,
)

logger = logging.getLogger(__name__)

MEMBER_PREFIX = "member_"
_FIX = ("ensemble only models trained with the same classes (same order), image checks, "
        "tiling and stain normalisation, e.g. the folds of one cross-validation run")


@keras.saving.register_keras_serializable(package="neuroblastoma_cnn")
class WeightedMean(keras.layers.Layer):
    """Weighted mean of same-shape inputs (the members' probabilities), always in float32.

    The weights are fixed configuration, not trainable variables (``member_weights``: the name
    ``weights`` belongs to Keras). float32 whatever the global policy: probabilities averaged
    in float16 would lose the precision the tables and metrics report.
    """

    def __init__(self, member_weights: Sequence[float], **kwargs: Any):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.member_weights = [float(w) for w in member_weights]

    def call(self, inputs: Sequence[Any]) -> Any:
        if len(inputs) != len(self.member_weights):
            raise ValueError(f"{self.name}: {len(inputs)} inputs for "
                             f"{len(self.member_weights)} weights")
        total = None
        for weight, value in zip(self.member_weights, inputs, strict=True):
            term = keras.ops.cast(value, "float32") * weight
            total = term if total is None else total + term
        return total

    def compute_output_shape(self, input_shape: Sequence[Any]) -> Any:
        return tuple(input_shape[0])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.pop("dtype", None)  # always float32 (set in __init__)
        return {**config, "member_weights": list(self.member_weights)}


# ----------------------------------------------------------------------------- checks


def _who(index: int, sources: Sequence[str] | None) -> str:
    """How a message names a member: its index, and its file when known."""
    if sources is not None and index < len(sources) and sources[index]:
        return f"Ensemble member {index} ('{sources[index]}')"
    return f"Ensemble member {index}"


_ABSENT = "<absent>"


def first_difference(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = ""
                     ) -> tuple[str, Any, Any] | None:
    """The first field (dotted path such as ``tiling.tile_size``, in record order) where two
    records differ, with both values; None when they are equal."""
    for key in [*a, *(k for k in b if k not in a)]:
        left, right = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if isinstance(left, Mapping) and isinstance(right, Mapping):
            found = first_difference(left, right, f"{prefix}{key}.")
            if found is not None:
                return found
        elif left != right:
            return f"{prefix}{key}", left, right
    return None


def _short(value: Any, limit: int = 80) -> str:
    """A value for a one-line message (a stain reference can be long)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _record_of(member: Any, who: str) -> Preprocessing:
    try:
        return preprocessing_of(member)
    except ModelError as exc:
        raise ModelError(f"{who}: {exc}", hint=exc.hint or _FIX) from exc


def _check_shape(member: Any, who: str, first: Any, first_who: str) -> None:
    """One image input and one probability output, the same as the first member's."""
    if len(member.inputs) != 1 or len(member.outputs) != 1:
        raise ModelError(f"{who} has {len(member.inputs)} inputs and {len(member.outputs)} "
                         "outputs; an ensemble member needs one image input and one "
                         "probability output.", hint="use models built by models.build_model")
    shape, expected = tuple(member.input_shape[1:]), tuple(first.input_shape[1:])
    if shape != expected:
        raise ModelError(f"{who} takes inputs {shape} but {first_who.lower()} takes {expected}.",
                         hint=_FIX)
    outputs, expected_outputs = int(member.output_shape[-1]), int(first.output_shape[-1])
    if outputs != expected_outputs:
        raise ModelError(f"{who} has {outputs} outputs but {first_who.lower()} has "
                         f"{expected_outputs}.", hint=_FIX)


def check_members(members: Sequence[Any], sources: Sequence[str] | None = None
                  ) -> Preprocessing:
    """Refuses members that cannot be averaged; returns their common preprocessing record.

    ``sources``: each member's file (or URI), named in the messages. Each refusal is one
    :class:`ModelError` naming the member and what to do.
    """
    members = list(members)
    if len(members) < 2:
        raise ModelError(f"An ensemble needs at least 2 members, got {len(members)}.",
                         hint="pass the models of every fold")
    if sources is not None and len(sources) != len(members):
        raise ParameterError(f"{len(sources)} sources for {len(members)} ensemble members.")
    first_who = _who(0, sources)
    _check_shape(members[0], first_who, members[0], first_who)
    record = _record_of(members[0], first_who)
    for index, member in enumerate(members[1:], start=1):
        who = _who(index, sources)
        _check_shape(member, who, members[0], first_who)
        difference = first_difference(record.to_dict(), _record_of(member, who).to_dict())
        if difference is not None:
            field, expected, got = difference
            raise ModelError(f"{who} was preprocessed differently from {first_who.lower()}: "
                             f"{field} = {_short(got)}, not {_short(expected)}.", hint=_FIX)
    return record


# ----------------------------------------------------------------------------- building


def normalised_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Weights summing to 1 (equal when None); refuses a wrong count, negative or non-finite
    values and an all-zero list."""
    if weights is None:
        return [1.0 / n] * n
    values = [float(w) for w in weights]
    if len(values) != n:
        raise ParameterError(f"{len(values)} ensemble weights for {n} members: give one each.")
    if any(not math.isfinite(w) or w < 0 for w in values) or sum(values) <= 0:
        raise ParameterError(f"Ensemble weights {values}: each must be finite and >= 0, and "
                             "their sum > 0.")
    total = math.fsum(values)
    return [w / total for w in values]


def build_ensemble(members: Sequence[keras.Model], weights: Sequence[float] | None = None,
                   name: str = "fold_ensemble", sources: Sequence[str] | None = None
                   ) -> keras.Model:
    """One Keras model whose output is the weighted mean of the members' probabilities.

    ``weights`` are normalised to sum 1 (None: equal). The members are checked first
    (:func:`check_members`); the ensemble carries their common record as
    ``model.preprocessing`` and shares their layers.
    """
    members = list(members)
    record = check_members(members, sources)
    shares = normalised_weights(weights, len(members))
    inputs = keras.Input(shape=tuple(members[0].input_shape[1:]), name="image")
    outputs = [
        keras.Model(member.inputs[0], member.outputs[0], name=f"{MEMBER_PREFIX}{i}")(inputs)
        for i, member in enumerate(members)
    ]
    mean = WeightedMean(shares, name="weighted_mean")(outputs)
    ensemble = keras.Model(inputs, mean, name=name)
    attach_preprocessing(ensemble, record, name)
    logger.info("Built ensemble '%s' of %d %s members (weights %s)", name, len(members),
                record.architecture, ", ".join(f"{w:.3f}" for w in shares))
    return ensemble


# ----------------------------------------------------------------------------- inspecting


def _mean_layer(model: Any) -> WeightedMean | None:
    """The layer producing the model's output when it is a :class:`WeightedMean`."""
    outputs = getattr(model, "outputs", None) or []
    if len(outputs) != 1:
        return None
    history = getattr(outputs[0], "_keras_history", None)
    layer = getattr(history, "operation", None) if history is not None else None
    return layer if isinstance(layer, WeightedMean) else None


def is_ensemble(model: Any) -> bool:
    """Whether ``model`` was built by :func:`build_ensemble` (also after a save and load)."""
    return _mean_layer(model) is not None


def _require(model: Any) -> WeightedMean:
    layer = _mean_layer(model)
    if layer is None:
        raise ModelError(f"Model '{getattr(model, 'name', model)}' is not an ensemble.")
    return layer


def ensemble_members(model: Any) -> list[keras.Model]:
    """The member networks of an ensemble, in weight order (each ``member_<i>``)."""
    layer = _require(model)
    node = layer._inbound_nodes[0]
    return [tensor._keras_history.operation for tensor in node.input_tensors]


def ensemble_weights(model: Any) -> list[float]:
    """The normalised weight of each member, in the order of :func:`ensemble_members`."""
    return list(_require(model).member_weights)
