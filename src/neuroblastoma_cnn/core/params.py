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
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from kedro.framework.hooks import hook_impl
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    ValidationError,
    field_validator,
    model_validator,
)

from neuroblastoma_cnn.core.errors import ParameterError
from neuroblastoma_cnn.images.decoding import (
    DecodeMethod,
    Fraction,
    ImageChecks,
    PositiveInt,
    TilingConfig,
)
from neuroblastoma_cnn.runtime.distribution import Distribution, JitCompile, Precision

NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
OpenFraction = Annotated[float, Field(ge=0.0, lt=1.0)]  # [0, 1)

Optimizer = Literal["sgd", "sgd_momentum", "rmsprop", "adagrad", "adam", "adamw"]
Monitor = Literal["val_macro_f1", "val_image_macro_f1", "val_loss", "val_accuracy"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
MONITORS: tuple[str, ...] = get_args(Monitor)

CONF_BASE = Path(__file__).resolve().parents[3] / "conf" / "base"


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


# ----------------------------------------------------------------------------- data stages


class IngestionParams(TilingConfig, ImageChecks, Params):
    """``ingestion``: which files are images, how patients are found, how tiles are cut."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    group_pattern: str | None
    max_images_per_class: PositiveInt | None  # a seeded random subset per class; None = all
    subset_seed: NonNegativeInt
    shard_size: PositiveInt
    decoding: DecodeMethod  # required here: TilingConfig's default only reads old records
    workers: NonNegativeInt  # processes tiling images; 0 = one per CPU core, 1 = in-process
    # Whole-slide images (required here: TilingConfig's None defaults only read old records).
    tile_um: PositiveFloat | None
    target_mpp: PositiveFloat | None
    slide_fallback_mpp: PositiveFloat | None

    @field_validator("group_pattern")
    @classmethod
    def _pattern_has_group(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from exc
        if "group" not in compiled.groupindex:
            raise ValueError(r"needs a named group 'group', e.g. '^(?P<group>[A-Z]+\d+)_'")
        return value

    @property
    def tiling(self) -> TilingConfig:
        return TilingConfig(**self.model_dump(include=set(TilingConfig.model_fields)))

    @property
    def image_checks(self) -> ImageChecks:
        return ImageChecks(**self.model_dump(include=set(ImageChecks.model_fields)))

    @property
    def group_regex(self) -> re.Pattern[str] | None:
        return None if self.group_pattern is None else re.compile(self.group_pattern)


class SplittingParams(Params):
    """``splitting``: how whole patients (or images) are allocated to train/validation/test."""

    strategy: Literal["patient", "image"]
    test_fraction: OpenFraction
    validation_fraction: OpenFraction
    n_folds: NonNegativeInt
    seed: NonNegativeInt

    @model_validator(mode="after")
    def _something_left_to_train_on(self) -> SplittingParams:
        if self.test_fraction + self.validation_fraction >= 1:
            raise ValueError(
                f"test_fraction + validation_fraction = {self.test_fraction} + "
                f"{self.validation_fraction}: must be below 1 so that something is left to "
                "train on")
        return self

    @property
    def unit(self) -> str:
        """The tile-index column whose values are moved whole between splits."""
        return {"patient": "group", "image": "image_path"}[self.strategy]


class AugmentationParams(Params):
    """``augmentation``: how the training split is balanced with transformed copies."""

    target_per_class: NonNegativeInt
    seed: NonNegativeInt
    rotation_degrees: Annotated[float, Field(ge=0.0, le=180.0)]
    width_shift: OpenFraction
    height_shift: OpenFraction
    horizontal_flip: bool
    fill_mode: Literal["reflect", "wrap", "constant", "nearest"]
    vertical_flip: bool
    rotate90: bool
    stain_jitter: OpenFraction
    brightness: Fraction
    contrast: OpenFraction
    grid_samples_per_class: PositiveInt
    batch_size: PositiveInt


# ----------------------------------------------------------------------------- models


class ResNet34Model(Params):
    """``<model>.model`` for a ResNet34 trained from scratch."""

    architecture: Literal["resnet34"]
    dropout: OpenFraction
    l1: Annotated[float, Field(ge=0.0)]
    l2: Annotated[float, Field(ge=0.0)]
    batch_norm_momentum: Annotated[float, Field(gt=0.0, lt=1.0)]

    @property
    def transfer(self) -> bool:
        return False


class ResNet50Model(Params):
    """``<model>.model`` for an ImageNet ResNet50 (``transfer``: head, then fine-tuning)."""

    architecture: Literal["resnet50"]
    transfer: bool
    weights: str | None
    dropout: OpenFraction
    l1: Annotated[float, Field(ge=0.0)]
    l2: Annotated[float, Field(ge=0.0)]


class ModelParams(RootModel[Annotated[ResNet34Model | ResNet50Model,
                                      Field(discriminator="architecture")]]):
    """``<model>.model``: the architecture and its own parameters (chosen by ``architecture``).

    ``root`` is the architecture's parameter model; :meth:`builder_kwargs` what its builder
    in ``models/`` takes.
    """

    @property
    def architecture(self) -> str:
        return self.root.architecture

    @property
    def transfer(self) -> bool:
        return self.root.transfer

    def builder_kwargs(self) -> dict[str, Any]:
        return self.root.model_dump(exclude={"architecture", "transfer"})

    @classmethod
    def parse(cls, raw: Any, key: str) -> ModelParams:
        try:
            return cls.__pydantic_validator__.validate_python(raw)
        except ValidationError as exc:
            raise ParameterError(describe(exc, key, None)) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Any:
        """As :meth:`Params.model_validate`: one-line problems for Kedro's validation."""
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as exc:
            raise ParameterError(describe(exc, "", None)) from None


class CosineSchedule(Params):
    type: Literal["cosine"]


class ExponentialSchedule(Params):
    type: Literal["exponential"]
    decay_epochs: PositiveInt
    decay_rate: Annotated[float, Field(gt=0.0, le=1.0)]


class PlateauSchedule(Params):
    type: Literal["plateau"]
    factor: Annotated[float, Field(gt=0.0, lt=1.0)]
    patience: PositiveInt


class WarmupCosineSchedule(Params):
    """Linear warm-up from 0 for ``warmup_epochs``, then cosine decay to 0 at the last epoch:
    large early steps on random weights (and on BatchNorm statistics that are not yet
    settled) destabilise training from scratch."""

    type: Literal["warmup_cosine"]
    warmup_epochs: NonNegativeInt


Schedule = Annotated[CosineSchedule | ExponentialSchedule | PlateauSchedule
                     | WarmupCosineSchedule, Field(discriminator="type")]


class OnlineAugmentationParams(Params):
    """``<model>.training.online_augmentation``: transforms drawn afresh for every training
    batch (see :mod:`neuroblastoma_cnn.images.online_augmentation`); a strength of 0 is off."""

    enabled: bool
    dihedral: bool
    stain_jitter: OpenFraction
    stain_space: Literal["hed", "od"]
    brightness: Annotated[float, Field(ge=0.0, le=1.0)]
    contrast: OpenFraction
    saturation: OpenFraction
    scale: OpenFraction
    translate: Annotated[float, Field(ge=0.0, lt=0.5)]
    crop: OpenFraction


class TrainingParams(Params):
    """``<model>.training``: optimiser, epochs, best-epoch rule; fine-tuning for transfer."""

    optimizer: Optimizer
    learning_rate: PositiveFloat
    momentum: OpenFraction
    #: Decoupled weight decay (Loshchilov & Hutter), applied by the optimiser; 0 = none.
    weight_decay: Annotated[float, Field(ge=0.0, lt=1.0)]
    schedule: Schedule | None
    label_smoothing: OpenFraction
    #: Validate and keep an exponential moving average of the weights, updated every step with
    #: this momentum (null = the raw weights), against the epoch-to-epoch swings that make the
    #: kept epoch a matter of luck on small data (on grouped BACH it did not steady them).
    ema_momentum: Annotated[float, Field(gt=0.0, lt=1.0)] | None
    epochs: PositiveInt
    #: Batches per epoch; null = one pass over the training tiles.
    steps_per_epoch: PositiveInt | None
    batch_size: PositiveInt
    #: ``shuffle``: every training tile once per epoch; ``balanced``: classes drawn equally often.
    sampling: Literal["shuffle", "balanced"]
    online_augmentation: OnlineAugmentationParams
    #: Stain normalisation fitted on the training tiles, stored with the model; null = none.
    stain_normalisation: Literal["macenko", "reinhard"] | None
    class_weights: bool
    monitor: Monitor
    #: The best epoch is chosen on the mean of ``monitor`` over this many epochs (1 = as is).
    monitor_window: PositiveInt
    early_stopping_patience: PositiveInt | None
    #: Training images shown in the grid of what the network sees (one batch or more).
    input_grid_samples: PositiveInt
    #: ``auto``: one device, several local GPUs (mirrored) or the cluster of ``TF_CONFIG``.
    distribution: Distribution
    #: ``auto``: mixed_float16 on GPU, float32 on CPU. ``mixed_bfloat16``: layers compute in
    #: bfloat16 (variables and the classifier's output stay float32); about twice the training
    #: steps per hour on CPUs with AVX-512 BF16. The saved model is float32 in every case.
    precision: Precision
    #: XLA compilation of the training step; ``auto``: on GPU only.
    jit_compile: JitCompile
    #: Learning rates multiplied by the number of replicas (``batch_size`` is the global batch).
    scale_learning_rate: bool
    seed: NonNegativeInt
    deterministic: bool
    in_memory_limit_mb: PositiveFloat
    #: Stage 2 of a transfer model; null for a model trained from scratch.
    fine_tune_blocks: Annotated[int, Field(ge=0, le=16)] | None
    fine_tune_epochs: NonNegativeInt | None
    fine_tune_learning_rate: PositiveFloat | None

    @model_validator(mode="after")
    def _fine_tune_all_or_nothing(self) -> TrainingParams:
        given = [self.fine_tune_blocks, self.fine_tune_epochs, self.fine_tune_learning_rate]
        if any(v is None for v in given) and any(v is not None for v in given):
            raise ValueError("fine_tune_blocks, fine_tune_epochs and fine_tune_learning_rate: "
                             "set all three (transfer models) or none (null)")
        return self

    @property
    def fine_tunes(self) -> bool:
        return bool(self.fine_tune_blocks) and bool(self.fine_tune_epochs)


# ----------------------------------------------------------------------------- outputs


class EvaluationParams(Params):
    """``evaluation``: which split is measured and how the interval is resampled."""

    split: Literal["train", "validation", "test"]
    batch_size: PositiveInt
    bootstrap_samples: PositiveInt
    seed: NonNegativeInt
    in_memory_limit_mb: PositiveFloat
    misclassified_per_class: PositiveInt
    #: Also predict with test-time augmentation (mean over the 8 symmetries), reported beside.
    tta: bool
    #: Store the temperature fitted on the validation images in the model's record, so every
    #: later prediction of the model is scaled by it (false: fitted and reported only).
    temperature_scaling: bool


class PredictParams(Params):
    """``predict``: which model, and what to do with it (not how images are tiled)."""

    model: Annotated[str, Field(min_length=1)]
    version: str | None
    batch_size: PositiveInt
    workers: PositiveInt
    min_confidence: Fraction
    background_fallback_tiles: PositiveInt
    gradcam: bool
    gradcam_max_side: PositiveInt | None
    gradcam_alpha: Fraction
    #: Also predict with test-time augmentation (mean over the 8 symmetries), in extra columns.
    tta: bool
    #: A scikit-learn head fitted on the model's features (`kedro run --pipeline=<model>_features`)
    #: that classifies them instead of the model's softmax; None = the model's own softmax.
    head: Annotated[str, Field(min_length=1)] | None
    #: Whole-slide images: the longest side of the thumbnail under the class heatmaps, and how
    #: many of the most confident tiles the Grad-CAM gallery shows.
    slide_thumbnail_side: PositiveInt
    slide_gallery_tiles: PositiveInt


class FloorParams(Params):
    """``cross_validation.floor``: the classical floor (colour + texture statistics, RBF SVM)."""

    enabled: bool
    downscale: PositiveInt
    c_grid: Annotated[list[PositiveFloat], Field(min_length=1)]
    gamma_factors: Annotated[list[PositiveFloat], Field(min_length=1)]
    inner_folds: Annotated[int, Field(ge=2)]
    calibration: Literal["sigmoid", "isotonic"]


class EnsembleParams(Params):
    """``cross_validation.ensemble``: how the fold models' probabilities are averaged."""

    weights: Literal["equal", "validation"]


class CrossValidationParams(Params):
    """``cross_validation``: K folds of whole patients, the floor on the same folds, and the
    fold ensemble (scored on the outer test patients when ``outer_test``)."""

    n_folds: Annotated[int, Field(ge=2)]
    seed: NonNegativeInt
    outer_test: bool
    validation_fraction: Annotated[float, Field(gt=0.0, lt=1.0)]
    storage: Annotated[str, Field(min_length=1)]
    workers: NonNegativeInt
    heartbeat_seconds: PositiveInt
    max_retries: NonNegativeInt
    log_fold_models: bool
    ensemble: EnsembleParams
    floor: FloorParams


#: Top-level groups and their models; every ``<model>`` group has ``model`` and ``training``.
GROUPS: dict[str, type[Params]] = {
    "ingestion": IngestionParams,
    "splitting": SplittingParams,
    "augmentation": AugmentationParams,
    "evaluation": EvaluationParams,
    "predict": PredictParams,
    "cross_validation": CrossValidationParams,
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


# ----------------------------------------------------------------------------- messages


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
           "less_than_equal": "<="}
_BOUND_CTX = {"greater_than": "gt", "greater_than_equal": "ge", "less_than": "lt",
              "less_than_equal": "le"}


def describe(exc: ValidationError, key: str, model: type[BaseModel] | None) -> str:
    """One line per problem, joined by '; ': ``key.field = value: what is allowed``."""
    lines = []
    for error in exc.errors(include_url=False):
        loc = [str(p) for p in error["loc"] if not _is_union_tag(p, error)]
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


def _is_union_tag(part: Any, error: Mapping[str, Any]) -> bool:
    """Discriminated unions add the tag (e.g. 'exponential', 'resnet50') to an error's loc."""
    return isinstance(part, str) and part in {"cosine", "exponential", "plateau", "resnet34",
                                              "resnet50"} and part != error["loc"][-1]


def _known_keys(model: type[BaseModel] | None, path: list[str]) -> list[str]:
    if model is None or path:
        return []
    return list(model.model_fields)


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
