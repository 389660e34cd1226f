"""Evaluation nodes: test predictions per tile and per image, metrics, figures.

Image-level results (mean of tile probabilities) are the primary numbers, because a pathologist
grades an image, not a tile; tile-level numbers are reported beside them with a ``tile_`` prefix.
The confidence interval resamples groups (patients), never tiles.

Tiles reach the model as in training: through the stain reference in the model's record, if it
has one. With ``tta`` the tiles are also predicted under the eight exact symmetries and the
mean is reported beside the plain prediction (``tta_prob_<class>`` / ``tta_predicted``
columns, ``tta`` block of the metrics); the plain prediction stays the headline.

Calibration: :func:`calibrate_model` fits a temperature on the *validation* images (never the
test ones) and, with ``temperature_scaling``, stores it in the model's record before the model
is saved, so every later prediction of the model is scaled; the test metrics report the ECE
before and after either way (``calibration`` block), with a reliability diagram per split.
It also calibrates prediction sets (``analysis.conformal``) on the validation images, as the
saved model will output them, and stores them in the record, so every answer of the model
carries ``prediction_set`` / ``refer``; the test metrics say what the sets did on the test
images (``prediction_sets`` block). Too few validation images: no sets, one warning.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from neuroblastoma_cnn.analysis import metrics as m
from neuroblastoma_cnn.analysis.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    image_means,
    image_nll,
    plot_reliability,
)
from neuroblastoma_cnn.analysis.conformal import ClassConditionalConformal, set_report
from neuroblastoma_cnn.analysis.model_card import (
    build_model_card,
    count_parts,
    markdown_to_html,
)
from neuroblastoma_cnn.analysis.predictions import (
    aggregate_image_probabilities,
    class_names_of,
    model_probabilities,
    probability_column,
    probability_columns,
)
from neuroblastoma_cnn.analysis.tta import TTA_PREFIX, tta_probabilities
from neuroblastoma_cnn.core.errors import DataError, ModelError
from neuroblastoma_cnn.datasets.tile_store import TileStore
from neuroblastoma_cnn.images.preprocessing import Preprocessing, preprocessing_of
from neuroblastoma_cnn.images.stain import as_seen_by_model
from neuroblastoma_cnn.images.tf_input import (
    class_names,
    encode_labels,
    make_tf_dataset,
    split_tile_ids,
)
from neuroblastoma_cnn.params import EvaluationParams, ModelParams, TrainingParams

from .gallery import misclassified_gallery, worst_misclassified

logger = logging.getLogger(__name__)

#: The nodes (the misclassified gallery lives in ``gallery``), and what tests reach through here.
__all__ = [
    "TTA_PREFIX", "aggregate_image_predictions", "calibrate_model", "calibration_metrics",
    "compute_test_metrics", "fit_prediction_sets", "misclassified_gallery", "plot_evaluation",
    "plot_test_reliability", "predict_split_tiles", "prediction_set_metrics", "tta_columns",
    "worst_misclassified", "write_model_card",
]

def tta_columns(frame: pd.DataFrame) -> list[str]:
    """The ``tta_prob_<class>`` columns of a predictions table, in class order."""
    return [c for c in frame.columns if str(c).startswith(TTA_PREFIX + "prob_")]


def _check_finite(tile_predictions: pd.DataFrame) -> None:
    """A model that diverged in training outputs NaN: say so, instead of failing in a metric.
    (Studies replace such outputs before scoring a trial, so the check sits here, not in the
    prediction node.)"""
    prob = tile_predictions[probability_columns(tile_predictions)].to_numpy(dtype=float)
    bad = ~np.isfinite(prob).all(axis=1)
    if bad.any():
        raise ModelError(
            f"The model outputs NaN or infinite probabilities for {int(bad.sum())} of "
            f"{len(prob)} test tiles: training diverged, so it is not evaluated or promoted.",
            hint="lower <model>.training.learning_rate, or use a warm-up schedule",
        )


def predict_split_tiles(
    model: Any, tiles: TileStore, split_table: pd.DataFrame, params: EvaluationParams
) -> pd.DataFrame:
    """Class probabilities for every tile of the evaluated split (``params.split``)."""
    split = params.split
    ids = split_tile_ids(split_table, split)
    if not ids:
        raise DataError(f"The split table has no '{split}' tiles to evaluate.")
    classes = class_names(tiles)
    trained_on = list(preprocessing_of(model).classes)
    if trained_on != classes:
        raise DataError(
            f"The model was trained on classes {trained_on} but the tiles have {classes}."
        )
    rows = tiles.rows(ids)
    seen = as_seen_by_model(tiles, preprocessing_of(model).stain_reference)
    data = make_tf_dataset(seen, ids, None, params.batch_size,
                           in_memory_limit_mb=params.in_memory_limit_mb)
    prob = model_probabilities(model, model.predict(data, verbose=0))
    out = rows[["tile_id", "image_path", "label", "group"]].copy()
    out["y_true"] = encode_labels(rows["label"], classes)
    for i, name in enumerate(classes):
        out[probability_column(name)] = prob[:, i]
    out["predicted"] = [classes[i] for i in prob.argmax(axis=1)]
    if params.tta:
        tta = tta_probabilities(model, data)
        for i, name in enumerate(classes):
            out[TTA_PREFIX + probability_column(name)] = tta[:, i]
        out[TTA_PREFIX + "predicted"] = [classes[i] for i in tta.argmax(axis=1)]
    logger.info("Predicted %d %s tiles from %d images", len(out), split,
                out["image_path"].nunique())
    return out


def aggregate_image_predictions(tile_predictions: pd.DataFrame) -> pd.DataFrame:
    """One row per source image: the mean of its tiles' probabilities and the argmax class."""
    images = aggregate_image_probabilities(tile_predictions)
    classes = class_names_of(images)
    images["y_true"] = images["label"].astype(str).map({c: i for i, c in enumerate(classes)})
    images["predicted"] = [
        classes[i] for i in images[probability_columns(images)].to_numpy().argmax(axis=1)
    ]
    tta = tta_columns(tile_predictions)
    if tta:
        means = tile_predictions.groupby("image_path", sort=True)[tta].mean()
        images[tta] = means.loc[images["image_path"]].to_numpy()
        images[TTA_PREFIX + "predicted"] = [
            classes[i] for i in images[tta].to_numpy().argmax(axis=1)]
    return images


def compute_test_metrics(
    image_predictions: pd.DataFrame, tile_predictions: pd.DataFrame, params: EvaluationParams,
    calibration: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any], pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Metrics, classification report and confusion matrices of the test images (with
    ``calibration``, from :func:`calibrate_model`: also the test ECE before/after scaling).

    Returns the full metrics (JSON), the flat numeric ones for MLflow, the report and the
    confusion matrix as counts and row-normalised.
    """
    _check_finite(tile_predictions)
    classes = class_names_of(image_predictions)
    y_true = image_predictions["y_true"].to_numpy(dtype=int)
    y_prob = image_predictions[probability_columns(image_predictions)].to_numpy()
    y_pred = y_prob.argmax(axis=1)
    metrics = m.classification_metrics(y_true, y_prob, classes)
    metrics["macro_f1_ci"] = m.bootstrap_macro_f1(
        y_true, y_pred, image_predictions["group"].astype(str).to_numpy(),
        n_boot=params.bootstrap_samples, seed=params.seed,
    )
    tile_true = tile_predictions["y_true"].to_numpy(dtype=int)
    tile_prob = tile_predictions[probability_columns(tile_predictions)].to_numpy()
    tile_metrics = m.classification_metrics(tile_true, tile_prob, classes)
    metrics["tile"] = {k: tile_metrics[k] for k in ("accuracy", "balanced_accuracy", "f1_macro")}
    if calibration is not None:
        metrics["calibration"] = calibration_metrics(tile_predictions, calibration)
        if calibration.get("prediction_sets"):
            metrics["prediction_sets"] = prediction_set_metrics(
                image_predictions, calibration["prediction_sets"])
    tta = tta_columns(image_predictions)
    if tta:
        metrics["tta"] = _tta_metrics(image_predictions, tile_predictions, classes, params)
    metrics["n_test_images"] = len(image_predictions)
    metrics["n_test_tiles"] = len(tile_predictions)
    metrics["n_test_groups"] = int(image_predictions["group"].nunique())

    flat = m.flatten_metrics(metrics, prefix="test_")
    mlflow_metrics = {k: {"value": v, "step": 0} for k, v in flat.items()}
    report = m.classification_report_frame(y_true, y_pred, classes)
    counts = m.confusion_matrix_frame(y_true, y_pred, classes, normalize=False)
    normalized = m.confusion_matrix_frame(y_true, y_pred, classes, normalize=True)
    ci = metrics["macro_f1_ci"]
    logger.info(
        "Test (%d images, %d groups): macro-F1 %.3f [95%% CI %.3f-%.3f], accuracy %.3f",
        len(image_predictions), metrics["n_test_groups"], metrics["f1_macro"], ci["low"],
        ci["high"], metrics["accuracy"],
    )
    if tta:
        t = metrics["tta"]
        logger.info("Test with TTA (8 symmetries): macro-F1 %.3f [95%% CI %.3f-%.3f], "
                    "accuracy %.3f", t["f1_macro"], t["macro_f1_ci"]["low"],
                    t["macro_f1_ci"]["high"], t["accuracy"])
    return metrics, mlflow_metrics, report, counts, normalized


def _tta_metrics(image_predictions: pd.DataFrame, tile_predictions: pd.DataFrame,
                 classes: list[str], params: EvaluationParams) -> dict[str, Any]:
    """The headline metrics of the test-time-augmented prediction, same definitions."""
    y_true = image_predictions["y_true"].to_numpy(dtype=int)
    y_prob = image_predictions[tta_columns(image_predictions)].to_numpy()
    full = m.classification_metrics(y_true, y_prob, classes)
    out = {k: full[k] for k in ("accuracy", "balanced_accuracy", "f1_macro")}
    out["macro_f1_ci"] = m.bootstrap_macro_f1(
        y_true, y_prob.argmax(axis=1), image_predictions["group"].astype(str).to_numpy(),
        n_boot=params.bootstrap_samples, seed=params.seed)
    tile_true = tile_predictions["y_true"].to_numpy(dtype=int)
    tile_prob = tile_predictions[tta_columns(tile_predictions)].to_numpy()
    out["tile_f1_macro"] = m.classification_metrics(tile_true, tile_prob, classes)["f1_macro"]
    return out


# --------------------------------------------------------------------- calibration


def _image_arrays(tile_predictions: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image labels, each tile's image index (images sorted by path) and the tile probabilities."""
    codes, images = pd.factorize(tile_predictions["image_path"], sort=True)
    y_tiles = tile_predictions["y_true"].to_numpy(dtype=int)
    y_image = np.zeros(len(images), dtype=int)
    y_image[codes] = y_tiles
    prob = tile_predictions[probability_columns(tile_predictions)].to_numpy(dtype=np.float64)
    return y_image, codes.astype(np.int64), prob


def calibrate_model(
    model: Any, tiles: TileStore, split_table: pd.DataFrame, params: EvaluationParams
) -> tuple[Any, dict[str, Any], Figure]:
    """Fits the temperature on the validation images' probabilities (before the model is saved).

    Returns the model (its record carrying T when ``temperature_scaling``, else none, and the
    prediction sets when the validation images suffice), the calibration summary (T, validation
    ECE and NLL before/after, ``prediction_sets``) and the validation reliability diagram. The
    model's own record is replaced, not the network: it is the same object.
    """
    # fit on raw outputs; a record's earlier sets never outlive a new calibration
    model.preprocessing = preprocessing_of(model).with_temperature(None).with_conformal(None)
    if not split_tile_ids(split_table, "validation"):
        if params.temperature_scaling:
            raise DataError("evaluation.temperature_scaling is true but the split table has no "
                            "validation images to fit the temperature on.",
                            hint="set splitting.validation_fraction above 0")
        logger.warning("No validation images: no temperature fitted, calibration not reported "
                       "and no prediction sets attached (set splitting.validation_fraction "
                       "above 0)")
        sets = {"coverage_target": params.conformal.coverage, "calibration_images": 0,
                "attached": False, "reason": "no validation images"}
        return model, {"temperature": None, "applied": False, "prediction_sets": sets}, \
            _message_figure("No validation images: no temperature fitted.")
    validation = params.model_copy(update={"split": "validation", "tta": False})
    raw_tiles = predict_split_tiles(model, tiles, split_table, validation)
    y, index, prob = _image_arrays(raw_tiles)
    temperature = fit_temperature(prob, y, index)
    before = image_means(prob, index, len(y))
    after = image_means(apply_temperature(prob, temperature), index, len(y))
    calibration = {
        "temperature": temperature, "applied": params.temperature_scaling,
        "n_validation_images": len(y),
        "validation_ece_before": expected_calibration_error(y, before),
        "validation_ece_after": expected_calibration_error(y, after),
        "validation_nll_before": image_nll(prob, y, index, 1.0),
        "validation_nll_after": image_nll(prob, y, index, temperature),
    }
    if params.temperature_scaling:
        model.preprocessing = model.preprocessing.with_temperature(temperature)
    record, calibration["prediction_sets"] = fit_prediction_sets(
        _as_served(raw_tiles, model.preprocessing.temperature), params)
    model.preprocessing = model.preprocessing.with_conformal(record)
    logger.info("Temperature %.3f fitted on %d validation images (%s): ECE %.3f -> %.3f",
                temperature, len(y), "stored with the model" if params.temperature_scaling
                else "reported only, evaluation.temperature_scaling: false",
                calibration["validation_ece_before"], calibration["validation_ece_after"])
    figure = plot_reliability(y, {"before": before, f"after (T = {temperature:.2f})": after},
                              "Validation reliability")
    return model, calibration, figure


def _as_served(tile_predictions: pd.DataFrame, temperature: float | None) -> pd.DataFrame:
    """Raw tile predictions as the saved model will output them (its temperature, if any)."""
    cols = probability_columns(tile_predictions)
    out = tile_predictions.copy()
    out[cols] = apply_temperature(tile_predictions[cols], temperature)
    return out


def fit_prediction_sets(tile_predictions: pd.DataFrame, params: EvaluationParams
                        ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Prediction sets calibrated on the images of ``tile_predictions`` (the validation tiles,
    probabilities as served; an image is the mean of its tiles, as the served model's is).

    Returns (the conformal record for the model, or None, and the summary). Too few images or
    patient groups to promise a coverage: no record and one warning, the run goes on.
    """
    images = aggregate_image_probabilities(tile_predictions)
    classes = class_names_of(images)
    settings = params.conformal
    conformal = ClassConditionalConformal(settings.coverage, settings.min_images,
                                          where="evaluation.conformal")
    summary: dict[str, Any] = {"coverage_target": settings.coverage,
                               "calibration_images": len(images)}
    reason = conformal.shortfall(len(images), images["group"], len(classes))
    if reason:
        logger.warning("No prediction sets attached to the model: the validation split has %s "
                       "(lower evaluation.conformal.min_images or give validation more "
                       "patients: splitting.validation_fraction)", reason)
        return None, {**summary, "attached": False, "reason": f"the validation split has {reason}"}
    conformal.fit(images[probability_columns(images)].to_numpy(np.float64), images["label"],
                  classes, images["group"])
    logger.info("Prediction sets (coverage %.2f) calibrated on %d validation images of %d "
                "patient groups, stored with the model", settings.coverage, len(images),
                images["group"].nunique())
    record = conformal.to_record()
    return record, {**summary, "attached": True, "record": record}


def prediction_set_metrics(image_predictions: pd.DataFrame, summary: dict[str, Any]
                           ) -> dict[str, Any]:
    """The ``prediction_sets`` block of the test metrics: the target, the calibration size and,
    when sets are attached, what they did on these images (``analysis.conformal.set_report``:
    coverage overall and per class, mean set size, share referred, accuracy of the accepted).
    Undefined numbers (no image of a class, none accepted) are None."""
    out = {k: summary.get(k) for k in ("coverage_target", "calibration_images", "attached")}
    out["attached"] = bool(out["attached"])
    if not out["attached"]:
        out["reason"] = summary.get("reason")
        return out
    conformal = ClassConditionalConformal.from_record(summary["record"])
    classes = class_names_of(image_predictions)
    sets = conformal.predict_sets(image_predictions[probability_columns(image_predictions)]
                                  .to_numpy(np.float64))
    report = set_report(sets, image_predictions["label"], classes,
                        image_predictions["predicted"])
    out.update(_finite_or_none(report))
    logger.info("Prediction sets on %d test images: coverage %s (target %.2f), mean set size "
                "%s, %s referred, accuracy of the accepted %s", report["n_images"],
                _number(report["coverage"]), conformal.coverage,
                _number(report["mean_set_size"]), _number(report["referred_share"]),
                _number(report["accepted_accuracy"]))
    return out


def _finite_or_none(value: Any) -> Any:
    """NaN (an undefined number) as None, so JSON and MLflow leave it out."""
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _number(value: float) -> str:
    return f"{value:.3f}" if np.isfinite(value) else "n/a"


def _before_after(tile_predictions: pd.DataFrame, calibration: dict[str, Any]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image labels and image probabilities without and with the temperature. When the model
    applied T itself its outputs are scaled: ``T' = 1 / T`` undoes it exactly."""
    y, index, prob = _image_arrays(tile_predictions)
    temperature = calibration.get("temperature")
    raw = apply_temperature(prob, 1.0 / temperature) if (
        calibration.get("applied") and temperature) else prob
    return (y, image_means(raw, index, len(y)),
            image_means(apply_temperature(raw, temperature), index, len(y)))


def calibration_metrics(tile_predictions: pd.DataFrame, calibration: dict[str, Any]
                     ) -> dict[str, Any]:
    """The calibration block of the test metrics: T, validation and test ECE before/after."""
    out = {k: v for k, v in calibration.items()
           if k not in ("n_validation_images", "prediction_sets")}
    out["applied"] = bool(calibration.get("applied"))
    if calibration.get("temperature") is None:
        return out
    y, before, after = _before_after(tile_predictions, calibration)
    out["ece_before"] = expected_calibration_error(y, before)
    out["ece_after"] = expected_calibration_error(y, after)
    logger.info("Calibration (T = %.3f): test ECE %.3f -> %.3f", calibration["temperature"],
                out["ece_before"], out["ece_after"])
    return out


def plot_test_reliability(tile_predictions: pd.DataFrame, calibration: dict[str, Any]
                          ) -> Figure:
    """Reliability diagram of the evaluated images, before and after the temperature."""
    temperature = calibration.get("temperature")
    if temperature is None:
        y, index, prob = _image_arrays(tile_predictions)
        return plot_reliability(y, {"as output": image_means(prob, index, len(y))},
                                "Test reliability")
    y, before, after = _before_after(tile_predictions, calibration)
    return plot_reliability(y, {"before": before, f"after (T = {temperature:.2f})": after},
                            "Test reliability")


def _message_figure(text: str) -> Figure:
    fig = Figure(figsize=(6, 2), layout="constrained")
    ax = fig.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")
    return fig


def plot_evaluation(
    image_predictions: pd.DataFrame,
    confusion_counts: pd.DataFrame,
    confusion_normalized: pd.DataFrame,
    training_history: pd.DataFrame,
) -> tuple[Any, Any, Any]:
    """Confusion matrix, training curves and ROC figures for 08_reporting and MLflow."""
    classes = class_names_of(image_predictions)
    y_true = image_predictions["y_true"].to_numpy(dtype=int)
    y_prob = image_predictions[probability_columns(image_predictions)].to_numpy()
    return (
        m.plot_confusion_matrix(confusion_counts, confusion_normalized),
        m.plot_training_curves(training_history),
        m.plot_roc_curves(y_true, y_prob, classes),
    )



# --------------------------------------------------------------------- model card


def write_model_card(
    test_metrics: dict[str, Any], training_history: pd.DataFrame, split_table: pd.DataFrame,
    tiles: TileStore, model: ModelParams, training: TrainingParams,
    evaluation: EvaluationParams, run_context: dict[str, Any],
    floor_metrics: dict[str, Any] | None = None,
) -> tuple[str, str]:
    """The run's model card, Markdown and HTML (see ``model_card``); preprocessing comes from
    the tile store's record, the one the model was trained on. The counts per split come from
    the split table (the reporting layer's split summary would make kedro-viz see the model
    namespace read a report and write predictions: a layer cycle)."""
    record = Preprocessing.from_store(tiles)
    counts = count_parts(split_table, split_table["split"])
    card = build_model_card(test_metrics, training_history, counts, record, model,
                            training, evaluation, run_context, floor_metrics)
    return card, markdown_to_html(card, title=f"Model card: {model.architecture}")
