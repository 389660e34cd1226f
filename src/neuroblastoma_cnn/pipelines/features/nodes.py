"""CNN features with scikit-learn heads: the study's third technique.

The trained CNN (or an untrained / ImageNet ResNet50) turns every tile into its pooled
penultimate features; scikit-learn classifiers ("heads") are fitted on the training tiles'
features, and judged exactly like the CNN: tile probabilities averaged per image, the same
metrics, bootstrap interval over patients, report and confusion matrix, on the same test split.

The feature table (one row per tile) carries where it came from in ``DataFrame.attrs[ATTRS]``
(kept in the parquet file): the extractor's identity (architecture, source, a hash of its
weights, a hash of its preprocessing record, classes, feature dimension) and the tiles version.
Every head is saved with that identity, so prediction refuses a head whose extractor is not the
model it is given. See :mod:`.heads` for the estimators, grouped folds and calibration.
"""

from __future__ import annotations

import json
import logging
import re
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neuroblastoma_cnn.analysis import predictions as pt
from neuroblastoma_cnn.core.errors import DataError, ModelError
from neuroblastoma_cnn.datasets.tile_store import TileStore
from neuroblastoma_cnn.images.tf_input import class_names, make_tf_dataset
from neuroblastoma_cnn.models import families
from neuroblastoma_cnn.models.feature_heads import check_head_extractor, head_probabilities

from .heads import as_heads_params, fit_head, group_folds
from .params import ExtractionParams, ExtractorParams, HeadsParams
from .scoring import evaluate_one, evaluate_predictors, image_predictions, plot_predictors

logger = logging.getLogger(__name__)

#: The nodes (the scoring ones live in ``scoring``), and what tests reach through this module.
__all__ = [
    "ATTRS", "CNN_PREDICTOR", "CNN_PREFIX", "FEATURE_PREFIX", "HEAD_FORMAT", "ID_COLUMNS",
    "comparison_table", "evaluate_one", "evaluate_predictors", "extract_feature_table",
    "feature_columns", "fit_heads", "image_predictions", "plot_predictors",
    "predict_evaluation_tiles", "predict_tile_probabilities", "select_extractor",
    "table_identity",
]

ATTRS = "neuroblastoma_cnn.features"
ID_COLUMNS = ["tile_id", "image_path", "label", "group", "split", "fold"]
FEATURE_PREFIX = "f"
CNN_PREFIX = "cnn_"  # cnn_prob_<class>: the extractor's own softmax, from the same forward pass
CNN_PREDICTOR = "cnn_softmax"
HEAD_FORMAT = "neuroblastoma_cnn.head/1"
_FEATURE_COLUMN = re.compile(rf"^{FEATURE_PREFIX}(\d+)$")


# ------------------------------------------------------------------------------ extraction


def select_extractor(trained_models: Any, tiles: TileStore, params: ExtractorParams) -> Any:
    """The network whose features ``<model>_features`` uses: a trained model (latest, or a
    catalog version), or the architecture built afresh without training (e.g. ResNet50 with
    ImageNet weights, or random weights as a floor)."""
    p = params if isinstance(params, ExtractorParams) else ExtractorParams.parse(
        params, "features.extractors")
    if p.source == "trained":
        return trained_models.load(p.architecture, p.version)
    from neuroblastoma_cnn.images.preprocessing import (  # noqa: PLC0415  (lazy: with the model)
        Preprocessing,
        attach_preprocessing,
    )

    if p.architecture != "resnet50" and p.weights is not None:
        raise ModelError(f"features.extractors: {p.architecture} has no pretrained weights "
                         f"('{p.weights}'); only resnet50 takes `weights`.",
                         hint="set weights: null, or source: trained")
    record = Preprocessing.from_store(tiles)
    extra = {"weights": p.weights} if p.architecture == "resnet50" else {}
    model = families.build_model(p.architecture, input_size=record.input_size,
                        num_classes=len(record.classes), seed=p.seed, **extra)
    attach_preprocessing(model, record.model_copy(update={"architecture": p.architecture}),
                         where=f"untrained {p.architecture}")
    model.model_source = f"untrained {p.architecture} (weights: {p.weights}, seed {p.seed})"
    logger.info("Feature extractor: %s", model.model_source)
    return model


_SPLITS: weakref.WeakKeyDictionary[Any, tuple[Any, Any]] = weakref.WeakKeyDictionary()


def _feature_split(model: Any) -> tuple[Any, Any]:
    """``features_and_head`` once per model: a new Keras model traces its predict function
    again (seconds for a ResNet), which would dominate repeated extractions of small sets."""
    if model not in _SPLITS:
        _SPLITS[model] = families.features_and_head(model)
    return _SPLITS[model]


def extract_feature_table(
    extractor: Any, tiles: TileStore, split_table: pd.DataFrame, params: ExtractionParams
) -> pd.DataFrame:
    """Pooled penultimate features (``f0..fN``) of every tile of the configured splits, plus the
    network's own softmax (``cnn_prob_<class>``) when it was trained, one row per tile.

    Built on the ResNet50 feature cache (``models.resnet50.extract_features``): one pass over
    a tf.data input that streams from the tile store above ``in_memory_limit_mb``.
    """
    from neuroblastoma_cnn.models.feature_heads import (  # noqa: PLC0415  (lazy: Keras)
        extractor_identity,
    )
    from neuroblastoma_cnn.models.resnet50 import extract_features  # noqa: PLC0415

    p = params if isinstance(params, ExtractionParams) else ExtractionParams.parse(
        params, "features.extraction")
    classes = class_names(tiles)
    backbone, head = _feature_split(extractor)
    identity = extractor_identity(extractor, int(backbone.output_shape[-1]))
    if identity["classes"] != classes:
        raise DataError(
            f"The extractor '{identity['source']}' was trained on classes {identity['classes']} "
            f"but the tiles have {classes}.",
            hint="train it on these tiles: "
                 f"`kedro run --pipeline=train_{identity['architecture']}`")
    rows = _rows_to_extract(tiles, split_table, p.splits)
    ids = [int(i) for i in rows["tile_id"]]
    data = make_tf_dataset(tiles, ids, None, p.batch_size, in_memory_limit_mb=p.in_memory_limit_mb)
    features, _ = extract_features(backbone, data, batch_size=p.batch_size)
    logger.info("Extracted %d x %d features from %s (%s tiles)", *features.shape,
                identity["source"], "/".join(p.splits))
    out = rows[ID_COLUMNS].copy()
    columns = {f"{FEATURE_PREFIX}{i}": features[:, i] for i in range(features.shape[1])}
    parts = [out, pd.DataFrame(columns)]
    if not str(identity["source"]).startswith("untrained"):  # a random head says nothing
        parts.append(_cnn_probabilities(head, features, classes))
    table = pd.concat(parts, axis=1)
    identity["tiles_version"] = Path(str(tiles.path)).parent.name
    table.attrs[ATTRS] = {"extractor": identity}
    return table


def _rows_to_extract(tiles: TileStore, split_table: pd.DataFrame,
                     splits: list[str]) -> pd.DataFrame:
    """The split table's rows in ``splits``, checked against the tile store they describe."""
    rows = split_table[split_table["split"].astype(str).isin(splits)].reset_index(drop=True)
    if rows.empty:
        raise DataError(f"The split table has no tiles in split(s) {splits}.")
    stored = tiles.rows([int(i) for i in rows["tile_id"]])
    for column in ("image_path", "label", "group"):
        if (stored[column].astype(str).to_numpy() != rows[column].astype(str).to_numpy()).any():
            raise DataError(
                f"The split table does not describe the tile store '{tiles.path}' ({column} "
                "differs): they come from different ingestion runs.",
                hint="rerun `kedro run --pipeline=splitting` on the current tiles")
    return rows


def _cnn_probabilities(head: Any, features: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """The network's own softmax (``cnn_prob_<class>``) from its head on the features."""
    # predict_on_batch per chunk: Keras' NumPy batching in predict() makes TF print a native
    # notice under op determinism.
    chunks = np.array_split(features, max(1, len(features) // 1024))
    prob = np.concatenate([np.asarray(head.predict_on_batch(chunk), dtype=np.float64)
                           for chunk in chunks])
    return pd.DataFrame({f"{CNN_PREFIX}{pt.PROB_PREFIX}{c}": prob[:, i]
                         for i, c in enumerate(classes)})


# ------------------------------------------------------------------------------ the identity


def table_identity(table: pd.DataFrame) -> dict[str, Any]:
    """The extractor identity stored with a feature table; a clear error when there is none."""
    info = table.attrs.get(ATTRS)
    if not isinstance(info, Mapping) or "extractor" not in info:
        raise DataError(
            "The feature table does not say which model extracted it.",
            hint="re-extract it with `kedro run --pipeline=<model>_features`")
    return dict(info["extractor"])


def feature_columns(table: pd.DataFrame) -> list[str]:
    """``f0 .. f{D-1}`` in order; an error when they are missing or not contiguous."""
    found = sorted((int(mt.group(1)), c) for c in table.columns
                   if (mt := _FEATURE_COLUMN.match(str(c))))
    if not found or [i for i, _ in found] != list(range(len(found))):
        raise DataError("The feature table has no contiguous f0..fN feature columns.",
                        hint="re-extract it with `kedro run --pipeline=<model>_features`")
    return [c for _, c in found]


def _check_against_split(table: pd.DataFrame, split_table: pd.DataFrame) -> None:
    """The feature rows must describe the split table's tiles (same tiles version)."""
    identity = table_identity(table)
    rerun = f"`kedro run --pipeline={identity.get('architecture', '<model>')}_features`"
    missing = [c for c in ID_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"The feature table lacks column(s) {missing}.", hint=f"rerun {rerun}")
    cols = ["tile_id", "image_path", "label", "group", "split"]
    left = table[cols].astype(str).set_index("tile_id")
    right = split_table[cols].astype(str).set_index("tile_id")
    unknown = left.index.difference(right.index)
    common = left.index.intersection(right.index)
    differ = (left.loc[common] != right.loc[common]).any(axis=1)
    if len(unknown) or differ.any():
        example = list(unknown[:3]) or list(differ[differ].index[:3])
        raise DataError(
            f"The feature table (tiles version {identity.get('tiles_version', '?')}) does not "
            f"match the current split table: tile(s) {example} are unknown or differ in image, "
            "label, group or split. It was extracted from another tiles version or split.",
            hint=f"rerun {rerun} on the current tiles and split")


# ---------------------------------------------------------------------------------- fitting


def fit_heads(
    feature_table: pd.DataFrame, split_table: pd.DataFrame, params: HeadsParams
) -> tuple[dict[str, dict[str, Any]], pd.DataFrame]:
    """Fits every configured head on the fitting splits' tiles; returns the head bundles (see
    :func:`head_bundle`) by name and the cross-validation results of every grid point."""
    p = as_heads_params(params)
    _check_against_split(feature_table, split_table)
    identity = table_identity(feature_table)
    classes = [str(c) for c in identity["classes"]]
    columns = feature_columns(feature_table)
    rows = _fitting_rows(feature_table, p.fit_splits, classes, identity)
    x = rows[columns].to_numpy(dtype=np.float32)
    y = _encode(rows["label"], classes)
    folds = group_folds(y, rows["group"].to_numpy(), rows["fold"].to_numpy(), p.cv, classes)
    logger.info("Fitting %d head(s) on %d tiles (%d groups, %d features), %d grouped CV folds",
                len(p.classifiers), len(rows), rows["group"].nunique(), len(columns), len(folds))
    bundles: dict[str, dict[str, Any]] = {}
    results = []
    for name, head in p.classifiers.items():
        fitted = fit_head(name, head, x, y, folds, p.scoring, p.n_jobs)
        results.append(fitted.cv_results)
        bundles[name] = {
            "format": HEAD_FORMAT,
            "name": name,
            "estimator": head.estimator,
            "model": fitted.model,
            "classes": classes,
            "feature_dim": len(columns),
            "extractor": identity,
            "best_params": fitted.best_params,
            "calibration": fitted.calibration,
            "cv": {"scoring": p.scoring, "mean": fitted.cv_score_mean,
                   "std": fitted.cv_score_std, "n_folds": len(folds),
                   "strategy": p.cv.strategy},
            "fit_splits": list(p.fit_splits),
            "n_fit_tiles": len(rows),
            "n_fit_groups": int(rows["group"].nunique()),
            "fit_seconds": fitted.fit_seconds,
        }
    cv_results = pd.concat(results, ignore_index=True)
    cv_results["params"] = [json.dumps(v, sort_keys=True) for v in cv_results["params"]]
    return bundles, cv_results


def _fitting_rows(feature_table: pd.DataFrame, fit_splits: list[str], classes: list[str],
                  identity: Mapping[str, Any]) -> pd.DataFrame:
    """The feature table's tiles in ``fit_splits``, refused unless every class has some."""
    rows = feature_table[feature_table["split"].astype(str).isin(fit_splits)]
    if rows.empty:
        raise DataError(f"The feature table has no tiles in split(s) {fit_splits}.",
                        hint="check features.heads.fit_splits")
    present = set(rows["label"].astype(str))
    absent = [c for c in classes if c not in present]
    if absent:
        arch = identity.get("architecture", "<model>")
        raise DataError(
            f"Class(es) {absent} have no tiles in the split(s) {fit_splits} that fit the heads, "
            "so no head can learn them.",
            hint=f"give them patients in the training split (check their images and the "
                 f"splitting fractions), then run `kedro run --pipeline=splitting` and "
                 f"`kedro run --pipeline={arch}_features`")
    return rows


def _encode(labels: pd.Series, classes: list[str]) -> np.ndarray:
    lookup = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels.astype(str)) - set(lookup))
    if unknown:
        raise DataError(f"Labels {unknown} are not among the extractor's classes {classes}.",
                        hint="the feature table and its model disagree; re-extract the features")
    return labels.astype(str).map(lookup).to_numpy(dtype=np.int64)


# ------------------------------------------------------------------------------ using heads


def predict_evaluation_tiles(
    feature_table: pd.DataFrame, heads: Mapping[str, Mapping[str, Any]], params: HeadsParams
) -> pd.DataFrame:
    """:func:`predict_tile_probabilities` on ``evaluate_split`` (the CNN's test split)."""
    return predict_tile_probabilities(feature_table, heads, as_heads_params(params).evaluate_split)


def predict_tile_probabilities(
    feature_table: pd.DataFrame, heads: Mapping[str, Mapping[str, Any]], split: str
) -> pd.DataFrame:
    """Tile probabilities of one split for the CNN's softmax and every head, one long table.

    Columns: ``predictor, tile_id, image_path, label, group, y_true, prob_<class>...,
    predicted`` (the evaluation's tile table plus ``predictor``).
    """
    identity = table_identity(feature_table)
    classes = [str(c) for c in identity["classes"]]
    rows = feature_table[feature_table["split"].astype(str) == split]
    if rows.empty:
        raise DataError(f"The feature table has no '{split}' tiles to evaluate.",
                        hint="check features.heads.evaluate_split and the split table")
    base = rows[["tile_id", "image_path", "label", "group"]].reset_index(drop=True)
    base["y_true"] = _encode(rows["label"], classes)
    x = rows[feature_columns(feature_table)].to_numpy(dtype=np.float32)
    probabilities: dict[str, np.ndarray] = {}
    cnn_cols = [f"{CNN_PREFIX}{pt.PROB_PREFIX}{c}" for c in classes]
    if all(c in rows.columns for c in cnn_cols):
        probabilities[CNN_PREDICTOR] = rows[cnn_cols].to_numpy(dtype=np.float64)
    for name, bundle in heads.items():
        check_head_extractor(bundle, identity)
        probabilities[name] = head_probabilities(bundle["model"], x, len(classes))
    frames = []
    for name, prob in probabilities.items():
        frame = base.copy()
        for i, c in enumerate(classes):
            frame[f"{pt.PROB_PREFIX}{c}"] = prob[:, i]
        frame["predicted"] = [classes[i] for i in prob.argmax(axis=1)]
        frame.insert(0, "predictor", name)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------- evaluation


def comparison_table(
    metrics: Mapping[str, Mapping[str, Any]], heads: Mapping[str, Mapping[str, Any]]
) -> pd.DataFrame:
    """CNN softmax vs each head on the same test images: one row per predictor."""
    rows = []
    for name, result in metrics.items():
        bundle = heads.get(name, {})
        ci = result["macro_f1_ci"]
        rows.append({
            "predictor": name,
            "estimator": bundle.get("estimator", "softmax" if name == CNN_PREDICTOR else ""),
            "f1_macro": result["f1_macro"], "f1_macro_low": ci["low"],
            "f1_macro_high": ci["high"], "accuracy": result["accuracy"],
            "balanced_accuracy": result["balanced_accuracy"],
            "cohen_kappa": result["cohen_kappa"], "roc_auc_macro": result["roc_auc_macro"],
            "tile_f1_macro": result["tile"]["f1_macro"],
            "n_images": result["n_test_images"], "n_groups": result["n_test_groups"],
            "cv_score": bundle.get("cv", {}).get("mean"),
            "best_params": json.dumps(bundle["best_params"], sort_keys=True) if bundle else "",
            "fit_seconds": bundle.get("fit_seconds"),
        })
    return pd.DataFrame(rows)



