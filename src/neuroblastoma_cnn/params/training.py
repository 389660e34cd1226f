"""Parameter groups of a model: ``<model>.model`` (the architecture, :class:`ModelParams`) and
``<model>.training`` (:class:`TrainingParams`, with its learning-rate schedules and online
augmentation).

Re-exported by :mod:`neuroblastoma_cnn.params` (import them from there).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import Field, RootModel, ValidationError, model_validator

from neuroblastoma_cnn.core.errors import ParameterError
from neuroblastoma_cnn.core.types import (
    Distribution,
    JitCompile,
    NonNegativeInt,
    OpenFraction,
    PositiveFloat,
    PositiveInt,
    Precision,
)
from neuroblastoma_cnn.params.base import Params, describe, union_tags

Optimizer = Literal["sgd", "sgd_momentum", "rmsprop", "adagrad", "adam", "adamw"]
Monitor = Literal["val_macro_f1", "val_image_macro_f1", "val_loss", "val_accuracy"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
MONITORS: tuple[str, ...] = get_args(Monitor)


# ----------------------------------------------------------------------------- models


class ResNet34Model(Params):
    """``<model>.model`` for a ResNet34 trained from scratch."""

    architecture: Literal["resnet34"]
    dropout: OpenFraction
    l1: Annotated[float, Field(ge=0.0)]
    l2: Annotated[float, Field(ge=0.0)]
    batch_norm_momentum: Annotated[float, Field(gt=0.0, lt=1.0)]
    #: (filters, blocks) per stage: He et al.'s four in base, two small ones in `tiny`.
    stages: Annotated[list[Annotated[list[PositiveInt], Field(min_length=2, max_length=2)]],
                      Field(min_length=1, max_length=4)]
    #: BatchNormalization's implementation, same maths: ``fused`` (one TensorFlow kernel) or
    #: ``keras`` (Keras 3's separate ops, slower).
    batch_norm: Literal["fused", "keras"]

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
            raise ParameterError(describe(exc, key, None, union_tags(cls))) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Any:
        """As :meth:`Params.model_validate`: one-line problems for Kedro's validation."""
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as exc:
            raise ParameterError(describe(exc, "", None, union_tags(cls))) from None


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
    #: ``auto``: mixed_float16 on GPU; mixed_bfloat16 on a CPU that multiplies bfloat16 natively
    #: (AMX-BF16, AVX-512 BF16), float32 on other CPUs. ``mixed_bfloat16``: layers compute in
    #: bfloat16 (variables and the classifier's output stay float32). The saved model is
    #: float32 in every case.
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

