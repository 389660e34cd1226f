"""Parameter groups of what comes out of a model: ``evaluation``, ``predict`` and
``cross_validation`` (with its floor and fold ensemble).

Re-exported by :mod:`neuroblastoma_cnn.params` (import them from there).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from neuroblastoma_cnn.core.types import Fraction, NonNegativeInt, PositiveFloat, PositiveInt
from neuroblastoma_cnn.params.base import Params

# ----------------------------------------------------------------------------- outputs


class ConformalParams(Params):
    """``select_model.conformal`` and ``evaluation.conformal``: class-conditional prediction
    sets (``analysis.conformal``)."""

    coverage: Annotated[float, Field(gt=0.0, lt=1.0)]
    min_images: Annotated[int, Field(ge=2)]


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
    #: Prediction sets calibrated on the validation images and stored with the model (too few
    #: validation images: none attached, one warning).
    conformal: ConformalParams


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
    #: Lowers the model's own pixel limit (``ingestion.max_image_pixels`` at training) for
    #: prediction: an image declaring more pixels is refused before decoding. None = the model's.
    max_image_pixels: PositiveInt | None
    #: The served model refuses a request whose images (base64) total more bytes than this;
    #: None = no limit (what models logged before the setting existed get).
    max_request_bytes: PositiveInt | None


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



class SelectedFloorParams(Params):
    """``select_model.floor``: the selected floor's search space (``models.selected_floor``)."""

    scales: Annotated[list[PositiveInt], Field(min_length=1)]
    feature_sets: Annotated[list[Annotated[list[str], Field(min_length=1)]], Field(min_length=1)]
    heads: Annotated[dict[Literal["logistic", "svm", "boosting"],
                          dict[str, Annotated[list[PositiveFloat], Field(min_length=1)]]],
                     Field(min_length=1)]
    inner_folds: Annotated[int, Field(ge=2)]
    calibration: Literal["temperature", "sigmoid", "isotonic"]


class HybridParams(Params):
    """``select_model.hybrid``: the stacked hybrid's bases and meta-learners."""

    bases: Annotated[list[str], Field(min_length=2)]
    meta: Annotated[dict[Literal["logistic", "boosting", "blend"],
                         dict[str, Annotated[list[Fraction | PositiveFloat],
                                             Field(min_length=1)]]],
                    Field(min_length=1)]
    inner_folds: Annotated[int, Field(ge=2)]

    @model_validator(mode="after")
    def _settings_in_range(self) -> HybridParams:
        for learner, settings in self.meta.items():
            for key, values in settings.items():
                bad = [v for v in values if (v > 1 if learner == "blend" else v <= 0)]
                if bad:
                    rule = "between 0 and 1" if learner == "blend" else "above 0"
                    raise ValueError(f"meta.{learner}.{key} = {bad}: must be {rule}")
        return self


class SelectModelParams(Params):
    """``select_model``: candidates scored on the same grouped folds, the tie rule, the selected
    floor's search, the hybrid and the prediction sets (checked against the family table by
    the pipeline's first node)."""

    candidates: Annotated[list[str], Field(min_length=1)]
    tie_rule: Literal["best", "cheaper"]
    bootstrap_samples: PositiveInt
    seed: NonNegativeInt
    floor: SelectedFloorParams
    conformal: ConformalParams
    hybrid: HybridParams
