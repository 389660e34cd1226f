"""Optimizers: the study's optimizers and learning-rate schedules, built from the parameters.

Kept apart from ``nodes.py``: a choice table the parameters name, used by every stage and read
on its own when adding an optimizer. Keras is imported inside the function.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from neuroblastoma_cnn.core.errors import ParameterError
from neuroblastoma_cnn.params import OPTIMIZERS, Schedule


def make_optimizer(
    name: str, learning_rate: float, momentum: float = 0.9, schedule: Any = None,
    steps_per_epoch: int = 1, epochs: int = 1, weight_decay: float = 0.0,
    ema_momentum: float | None = None,
) -> Any:
    """Builds one of the study's optimizers (or AdamW), with an optional learning-rate schedule,
    decoupled weight decay and a moving average of the weights (``ema_momentum``; see
    :func:`fit_stage` for how it is validated and kept).

    ``schedule`` is a validated schedule model (or a dict with the same keys); ``plateau`` is
    applied by a callback in :func:`fit_stage`, not here.
    """
    import keras  # noqa: PLC0415  (lazy: see the module docstring)

    lr: Any = learning_rate
    if isinstance(schedule, dict):
        schedule = _as_schedule(schedule)
    kind = getattr(schedule, "type", None)
    total = max(1, steps_per_epoch * epochs)
    if kind == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(learning_rate, total)
    elif kind == "warmup_cosine":
        warm = min(steps_per_epoch * schedule.warmup_epochs, total - 1)
        lr = (keras.optimizers.schedules.CosineDecay(
            0.0, total - warm, warmup_target=learning_rate, warmup_steps=warm)
            if warm > 0 else keras.optimizers.schedules.CosineDecay(learning_rate, total))
    elif kind == "exponential":
        lr = keras.optimizers.schedules.ExponentialDecay(
            learning_rate, decay_steps=max(1, steps_per_epoch * schedule.decay_epochs),
            decay_rate=schedule.decay_rate, staircase=True,
        )
    common: dict[str, Any] = {"weight_decay": float(weight_decay) or None}
    if ema_momentum is not None:
        common.update(use_ema=True, ema_momentum=float(ema_momentum))
    factories = {
        "sgd": lambda: keras.optimizers.SGD(lr, **common),
        "sgd_momentum": lambda: keras.optimizers.SGD(lr, momentum=momentum, **common),
        "rmsprop": lambda: keras.optimizers.RMSprop(lr, **common),
        "adagrad": lambda: keras.optimizers.Adagrad(lr, **common),
        "adam": lambda: keras.optimizers.Adam(lr, **common),
        "adamw": lambda: keras.optimizers.AdamW(
            lr, **{**common, "weight_decay": float(weight_decay)}),
    }
    if name not in factories:
        raise ParameterError(f"Unknown optimizer '{name}': choose one of {', '.join(OPTIMIZERS)}.")
    return factories[name]()


def _as_schedule(raw: dict[str, Any]) -> Any:
    """A schedule dict checked as the parameters are (for direct calls and tests)."""
    try:
        return TypeAdapter(Schedule).validate_python(raw)
    except Exception as exc:
        raise ParameterError(f"Unknown schedule {raw!r}: use null, cosine, warmup_cosine, "
                             "exponential or plateau, each with its keys.") from exc
