"""Typed ``features`` parameters (conf/base/parameters_features.yml holds every default).

Nodes declare these as the types of their ``params:`` inputs, so Kedro validates the YAML
before the first node runs; direct callers pass a dict through ``Model.parse(raw, key)``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from neuroblastoma_cnn.core.types import PositiveInt
from neuroblastoma_cnn.models import families
from neuroblastoma_cnn.params import Params

Split = Literal["train", "validation", "test"]


class ExtractorParams(Params):
    """``features.extractors.<model>``: which network gives the features in ``<model>_features``.

    ``trained``: the architecture's latest trained model (or catalog ``version``);
    ``untrained``: the architecture built afresh, not trained (ResNet50 ``weights``: imagenet, a
    local weights file, or null for random weights seeded by ``seed``). The ``train_<model>_
    features`` pipelines always use the model they have just trained.
    """

    architecture: Literal[tuple(families.trainable())]  # the CNNs this project trains
    source: Literal["trained", "untrained"]
    version: str | None
    weights: str | None
    seed: int


class ExtractionParams(Params):
    """``features.extraction``: how tiles are run through the extractor (bounded memory)."""

    batch_size: PositiveInt
    in_memory_limit_mb: Annotated[float, Field(gt=0)]
    splits: Annotated[list[Split], Field(min_length=1)]


class HeadParams(Params):
    """One head: which estimator, its fixed parameters, the grid searched, the calibration."""

    estimator: Literal["svc", "decision_tree", "logistic_regression", "hist_gradient_boosting"]
    params: dict[str, Any]
    grid: dict[str, list[Any]]
    calibration: Literal["sigmoid", "isotonic"] | None


class CvParams(Params):
    """Grouped folds: the split table's own ``fold`` column, or StratifiedGroupKFold."""

    strategy: Literal["split_folds", "stratified_group_kfold"]
    n_splits: Annotated[int, Field(ge=2)]  # stratified_group_kfold only
    shuffle: bool
    seed: int


class HeadsParams(Params):
    """``features.heads``: which tiles fit the heads, their grouped CV, the classifiers."""

    fit_splits: Annotated[list[Split], Field(min_length=1)]
    evaluate_split: Split
    scoring: str
    n_jobs: int
    cv: CvParams
    classifiers: Annotated[dict[str, HeadParams], Field(min_length=1)]
