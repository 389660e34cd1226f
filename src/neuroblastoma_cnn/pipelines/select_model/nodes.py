"""Model selection nodes: every candidate family scored out of fold on the same grouped folds,
ranked with intervals, the winner refitted and calibrated with prediction sets.

Why: on a few hundred images the model a user should serve is an empirical question (README
"Choosing a model"): a CNN from scratch, a colour/texture model or a blend of both may win,
and a single split cannot tell them apart. Every candidate here is scored on the folds of
``cross_validate`` (``cv_folds``): the CNN's fold models and the floor come from that
pipeline (finished folds are not trained again), the selected floor and the hybrid are fitted
fold by fold here. The table ranks them by pooled out-of-fold macro-F1 with a group-bootstrap
interval and per-fold paired comparisons with the best; ``tie_rule`` picks the winner.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neuroblastoma_cnn.analysis import metrics as m
from neuroblastoma_cnn.analysis.conformal import (
    ClassConditionalConformal,
    plot_risk_coverage,
    risk_coverage,
    set_report,
)
from neuroblastoma_cnn.analysis.model_card import unsure_section
from neuroblastoma_cnn.analysis.predictions import probability_column
from neuroblastoma_cnn.core.errors import DataError, ModelError, ParameterError
from neuroblastoma_cnn.images.preprocessing import Preprocessing, preprocessing_of
from neuroblastoma_cnn.models import families
from neuroblastoma_cnn.models.classical import CORE_GROUPS
from neuroblastoma_cnn.models.families import Capability
from neuroblastoma_cnn.models.selected_floor import (
    ClassicalImageModel,
    SelectedFloor,
    describe_bank,
)
from neuroblastoma_cnn.models.stacking import StackedHybrid, nested_oof
from neuroblastoma_cnn.params import (
    CrossValidationParams,
    FloorParams,
    PredictParams,
    SelectModelParams,
)
from neuroblastoma_cnn.serving.hybrid import HybridImageModel
from neuroblastoma_cnn.serving.pyfunc import log_raw_image_model
from neuroblastoma_cnn.serving.tiles import predict_files
from neuroblastoma_cnn.tracking import registry
from neuroblastoma_cnn.trials import statistics as st

logger = logging.getLogger(__name__)

HELD_OUT, OUTER = "held_out", "outer"
CV, OUTER_ROLE = "cv", "outer"
KEYS = ["image_path", "label", "group"]
#: The CNN families the selection cross-validates itself (no downloaded weights needed).
SELF_TRAINED_CNNS = ("resnet34",)


# ----------------------------------------------------------------------------- candidates


def check_candidates(params: SelectModelParams) -> list[str]:
    """The candidates that will be scored: every name must be a family that can be
    cross-validated; one that cannot run here (ResNet50 without its cross-validation) is
    skipped with one WARNING. One line naming the parameter otherwise."""
    kept = []
    for name in params.candidates:
        try:
            family = families.family(name)
        except ModelError as exc:  # reworded with the parameter that named it
            raise ParameterError(f"select_model.candidates: {exc}", hint="remove it or fix "
                                 "its spelling in conf/base/parameters_select_model.yml") from None
        if not family.able(Capability.CROSS_VALIDATE):
            raise ParameterError(
                f"select_model.candidates: '{name}' cannot be a selection candidate (it is not "
                f"scored on folds: {family.cannot})",
                hint="list families that cross-validate: " + ", ".join(
                    families.names(Capability.CROSS_VALIDATE)))
        if family.kind == "cnn" and name not in SELF_TRAINED_CNNS:
            logger.warning("select_model.candidates: %s skipped: the selection cross-validates "
                           "only %s (its ImageNet weights may be absent); run "
                           "cross_validate_%s where they are present", name,
                           ", ".join(SELF_TRAINED_CNNS), name)
            continue
        kept.append(family.name)
    if not any(families.family(n).able(Capability.SERVE) for n in kept):
        raise ParameterError(
            f"select_model.candidates: none of {kept} can be served, so no champion could be "
            "registered", hint="add one of " + ", ".join(
                families.names(Capability.CROSS_VALIDATE, Capability.SERVE)))
    if "hybrid" in kept:
        missing = [b for b in params.hybrid.bases if b not in kept or b == "hybrid"]
        if missing:
            raise ParameterError(f"select_model.hybrid.bases: {missing} are not scored "
                                 f"candidates ({kept})", hint="stack candidates listed in "
                                 "select_model.candidates")
    return kept


# ----------------------------------------------------------------------- the selected floor


def selected_floor_predictions(cv_folds: pd.DataFrame, raw_images: Path,
                               params: SelectModelParams) -> pd.DataFrame:
    """The selected floor fold by fold: fitted (its search included) on the other folds, scored
    on the held-out fold and the outer patients; rows as ``cv_floor_predictions``."""
    if "selected_floor" not in check_candidates(params):
        return pd.DataFrame(columns=["model", "fold", "set", *KEYS])
    space = params.floor
    paths = [Path(raw_images) / p for p in cv_folds["image_path"]]
    bank = describe_bank(paths, space.scales, where="select_model.floor")
    y = cv_folds["label"].astype(str).to_numpy()
    g = cv_folds["group"].astype(str).to_numpy()
    classes = sorted(set(y))
    is_cv = (cv_folds["role"] == CV).to_numpy()
    outer = (cv_folds["role"] == OUTER_ROLE).to_numpy()
    parts = []
    for fold in sorted(cv_folds.loc[is_cv, "fold"].astype(int).unique()):
        train = is_cv & (cv_folds["fold"] != fold).to_numpy()
        floor = SelectedFloor(space.scales, space.feature_sets, space.heads, space.inner_folds,
                              space.calibration, seed=params.seed + int(fold))
        floor.fit({s: b[train] for s, b in bank.items()}, y[train], g[train])
        for name, rows in ((HELD_OUT, is_cv & (cv_folds["fold"] == fold).to_numpy()),
                           (OUTER, outer)):
            if rows.any():
                prob = floor.probabilities_over({s: b[rows] for s, b in bank.items()}, classes)
                parts.append(_rows(cv_folds[rows], prob, classes, "selected_floor", int(fold),
                                   name))
    return pd.concat(parts, ignore_index=True)


def _rows(images: pd.DataFrame, prob: np.ndarray, classes: list[str], model: str, fold: int,
          name: str) -> pd.DataFrame:
    out = images[KEYS].reset_index(drop=True).assign(model=model, fold=fold, set=name)
    for i, c in enumerate(classes):
        out[probability_column(c)] = prob[:, i]
    out["predicted"] = [classes[i] for i in prob.argmax(axis=1)]
    return out


# ------------------------------------------------------------------------------ the table


def _classes(frame: pd.DataFrame) -> list[str]:
    return sorted(c.removeprefix("prob_") for c in frame.columns if c.startswith("prob_"))


def candidate_predictions(params: SelectModelParams, floor: pd.DataFrame,
                          selected_floor: pd.DataFrame, **cnn: pd.DataFrame
                          ) -> dict[str, pd.DataFrame]:
    """Each scored candidate's predictions (held-out and outer rows), by family name; the
    hybrid's held-out rows are nested out of fold, its outer rows from a hybrid fitted on every
    out-of-fold row."""
    available = dict(cnn)
    available["floor"] = floor  # the cross-validation's floor (ColourTextureSVM)
    available["selected_floor"] = selected_floor
    out = {}
    for name in check_candidates(params):
        if name == "hybrid":
            continue
        frame = available.get(name)
        if frame is None or frame.empty:
            raise DataError(f"select_model: no out-of-fold predictions of candidate '{name}' "
                            "(is cross_validation.floor.enabled false?)")
        out[name] = frame
    if "hybrid" in check_candidates(params):
        out["hybrid"] = hybrid_predictions(out, params)
    return out


def _aligned(frames: dict[str, pd.DataFrame], bases: list[str], part: str, classes: list[str]
             ) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The rows every base scored in ``part`` (outer: averaged over the fold models), aligned."""
    cols = [probability_column(c) for c in classes]
    keys = KEYS if part == OUTER else ["fold", *KEYS]
    merged = None
    for b in bases:
        rows = frames[b][frames[b]["set"] == part]
        rows = rows.groupby(keys, sort=True)[cols].mean().reset_index()
        rows = rows.rename(columns={c: f"{b}:{c}" for c in cols})
        merged = rows if merged is None else merged.merge(rows, on=keys, validate="1:1")
    assert merged is not None
    return merged, {b: merged[[f"{b}:{c}" for c in cols]].to_numpy() for b in bases}


def hybrid_predictions(frames: dict[str, pd.DataFrame], params: SelectModelParams
                       ) -> pd.DataFrame:
    """The stacked hybrid's rows: nested out of fold on the held-out rows, and on the outer
    patients from one hybrid fitted on every out-of-fold row."""
    hp = params.hybrid
    classes = _classes(frames[hp.bases[0]])

    def make() -> StackedHybrid:
        return StackedHybrid(hp.bases, hp.meta, hp.inner_folds, seed=params.seed)

    held, base = _aligned(frames, hp.bases, HELD_OUT, classes)
    prob = nested_oof(make, base, held["label"], held["group"], held["fold"], classes)
    parts = [_rows(held, prob, classes, "hybrid", 0, HELD_OUT).assign(fold=held["fold"])]
    outer, outer_base = _aligned(frames, hp.bases, OUTER, classes)
    if len(outer):
        hybrid = make().fit(base, held["label"], held["group"])
        parts.append(_rows(outer, hybrid.predict_proba(outer_base), classes, "hybrid", -1,
                           OUTER))
    return pd.concat(parts, ignore_index=True)


def _pooled(frame: pd.DataFrame, classes: list[str], params: SelectModelParams
            ) -> dict[str, float]:
    y = frame["label"].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy()
    pred = frame[[probability_column(c) for c in classes]].to_numpy(float).argmax(axis=1)
    ci = m.bootstrap_macro_f1(y, pred, frame["group"].astype(str).to_numpy(),
                              n_boot=params.bootstrap_samples, seed=params.seed)
    return {"f1": float(ci["point"]), "low": float(ci["low"]), "high": float(ci["high"]),
            "accuracy": float((y == pred).mean())}


def rank_candidates(predictions: dict[str, pd.DataFrame], params: SelectModelParams
                    ) -> pd.DataFrame:
    """One row per candidate, best first: pooled out-of-fold macro-F1 [95% CI over groups],
    per-fold mean, the paired per-fold difference to the best, its cost, and ``chosen``."""
    classes = _classes(next(iter(predictions.values())))
    pooled, per_fold = {}, {}
    for name, frame in predictions.items():
        held = frame[frame["set"] == HELD_OUT]
        pooled[name] = _pooled(held, classes, params)
        per_fold[name] = {int(f): _pooled(part, classes, params)["f1"]
                          for f, part in held.groupby("fold")}
    order = sorted(pooled, key=lambda n: (-pooled[n]["f1"], families.family(n).cost))
    best = order[0]
    folds = sorted(per_fold[best])
    rows = []
    for name in order:
        paired = st.paired_comparison([per_fold[name].get(f, np.nan) for f in folds],
                                      [per_fold[best][f] for f in folds])
        outer = predictions[name][predictions[name]["set"] == OUTER]
        rows.append({
            "model": name, "pooled_f1": pooled[name]["f1"], "pooled_ci_low": pooled[name]["low"],
            "pooled_ci_high": pooled[name]["high"], "pooled_accuracy": pooled[name]["accuracy"],
            "folds_mean": float(np.mean(list(per_fold[name].values()))),
            "vs_best_mean_diff": paired["mean_diff"], "vs_best_ci_low": paired["diff_ci_low"],
            "vs_best_ci_high": paired["diff_ci_high"], "wins": paired["wins"],
            "losses": paired["losses"], "p_value": paired["p_value"],
            "cost": families.family(name).cost, "outer_images": int(outer["image_path"].nunique()),
            "servable": families.family(name).able(Capability.SERVE),
        })
    table = pd.DataFrame(rows)
    table["chosen"] = table["model"] == choose_winner(table, params.tie_rule)
    return table


def choose_winner(table: pd.DataFrame, tie_rule: str) -> str:
    """``best``: the highest pooled macro-F1; ``cheaper``: the cheapest candidate whose interval
    overlaps the best one's (a difference the folds cannot resolve buys nothing). Only a
    candidate that can be served wins: a better one that cannot (the hybrid) is named in a
    WARNING, since the champion is what a user calls."""
    ranked = table.sort_values(["pooled_f1", "cost"], ascending=[False, True])
    if "servable" in ranked:
        top = ranked.iloc[0]
        ranked = ranked[ranked["servable"].astype(bool)]
        if str(top["model"]) != str(ranked.iloc[0]["model"]):
            logger.warning("select_model: %s ranks first (pooled macro-F1 %.3f) but cannot be "
                           "served (%s); the champion is chosen among the others",
                           top["model"], top["pooled_f1"], families.family(top["model"]).cannot)
    best = ranked.iloc[0]
    if tie_rule == "best":
        return str(best["model"])
    overlapping = ranked[ranked["pooled_ci_high"] >= best["pooled_ci_low"]]
    return str(overlapping.sort_values(["cost", "pooled_f1"], ascending=[True, False])
               .iloc[0]["model"])


def selection_markdown(table: pd.DataFrame, params: SelectModelParams) -> str:
    """The ranking as Markdown, with how to read it."""
    def f(v: Any) -> str:
        return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"

    lines = ["# Model selection", "",
             f"Candidates scored on the same grouped folds; winner by tie rule "
             f"`{params.tie_rule}` (README \"Choosing a model\").", "",
             "| Model | Pooled out-of-fold macro-F1 [95% CI] | Folds mean | vs best per fold: "
             "Δ [95% CI], won/lost | Cost | Chosen |", "|---|---|---|---|---|---|"]
    for r in table.to_dict("records"):
        served = "" if r.get("servable", True) else " (cannot be served)"
        lines.append(f"| {r['model']}{served} | {f(r['pooled_f1'])} [{f(r['pooled_ci_low'])}-"
                     f"{f(r['pooled_ci_high'])}] | {f(r['folds_mean'])} | "
                     f"{f(r['vs_best_mean_diff'])} [{f(r['vs_best_ci_low'])}, "
                     f"{f(r['vs_best_ci_high'])}], {r['wins']}/{r['losses']} | {r['cost']} | "
                     f"{'**yes**' if r['chosen'] else ''} |")
    return "\n".join(lines) + "\n"


def select_model(cv_folds: pd.DataFrame, cv_floor_predictions: pd.DataFrame,
                 selected_floor: pd.DataFrame, params: SelectModelParams,
                 **cnn_predictions: pd.DataFrame
                 ) -> tuple[pd.DataFrame, str, pd.DataFrame, dict[str, Any]]:
    """The ranking table, its Markdown, every candidate's predictions and the MLflow metrics."""
    predictions = candidate_predictions(params, cv_floor_predictions, selected_floor,
                                        **cnn_predictions)
    table = rank_candidates(predictions, params)
    winner = str(table.loc[table["chosen"], "model"].iloc[0])
    for r in table.to_dict("records"):
        logger.info("Selection: %-15s pooled out-of-fold macro-F1 %.3f [%.3f-%.3f]%s",
                    r["model"], r["pooled_f1"], r["pooled_ci_low"], r["pooled_ci_high"],
                    "  <- chosen" if r["chosen"] else "")
    metrics = {f"{r['model']}.{k}": {"value": float(r[k]), "step": 0}  # prefix: select
               for r in table.to_dict("records")
               for k in ("pooled_f1", "pooled_ci_low", "pooled_ci_high")}
    everything = pd.concat(list(predictions.values()), ignore_index=True)
    logger.info("Selection winner: %s (tie rule %s; %d images in %d folds)", winner,
                params.tie_rule, int((cv_folds["role"] == CV).sum()),
                cv_folds.loc[cv_folds["role"] == CV, "fold"].nunique())
    return table, selection_markdown(table, params), everything, metrics


# ------------------------------------------------------------------ the winner's doubt


def calibrate_prediction_sets(model_selection: pd.DataFrame,
                              selection_predictions: pd.DataFrame,
                              params: SelectModelParams) -> dict[str, Any]:
    """The winner's prediction sets, calibrated on its out-of-fold predictions (each image
    scored by a model that never saw its patient): the record the champion carries."""
    winner = str(model_selection.loc[model_selection["chosen"], "model"].iloc[0])
    rows = selection_predictions[selection_predictions["model"] == winner]
    classes = _classes(rows)
    held = rows[rows["set"] == HELD_OUT]
    conformal = ClassConditionalConformal(params.conformal.coverage,
                                          params.conformal.min_images)
    conformal.fit(held[[probability_column(c) for c in classes]].to_numpy(float),
                  held["label"], classes, held["group"])
    return {"model": winner, "coverage_target": params.conformal.coverage,
            "calibration_images": len(held), "calibration": conformal.to_record()}


def prediction_set_report(calibration: dict[str, Any], champion_outer: pd.DataFrame
                          ) -> tuple[dict[str, Any], pd.DataFrame, Any, dict[str, Any]]:
    """What the served champion's sets do on the outer patients (which neither chose nor
    calibrated): coverage overall and per class, mean set size, share referred, accuracy of
    the accepted images, and the risk-coverage curve; from the champion's own probabilities
    of those images (``refit_champion``), so the figures describe the model a user calls.
    Returns (the calibration with its ``outer`` report, the curve, its figure, the figures as
    MLflow metrics ``conformal.*``)."""
    winner = calibration["model"]
    conformal = ClassConditionalConformal.from_record(calibration["calibration"])
    classes = list(conformal.classes_)
    report = dict(calibration)
    if len(champion_outer):
        prob = champion_outer[[probability_column(c) for c in classes]].to_numpy(float)
        sets = conformal.predict_sets(prob)
        report["outer"] = set_report(sets, champion_outer["label"], classes,
                                     np.asarray(classes)[prob.argmax(axis=1)])
        curve = risk_coverage(prob, champion_outer["label"], classes)
        logger.info("Prediction sets of the champion (%s) on %d outer images: coverage %.3f "
                    "(target %.2f), mean set size %.2f, %.0f%% referred, accuracy of the "
                    "accepted %.3f", winner, len(champion_outer), report["outer"]["coverage"],
                    conformal.coverage, report["outer"]["mean_set_size"],
                    100 * report["outer"]["referred_share"],
                    report["outer"]["accepted_accuracy"])
    else:
        curve = pd.DataFrame(columns=["referred_share", "accepted_accuracy"])
        logger.warning("No outer patients (cross_validation.outer_test: false): prediction "
                       "sets calibrated but not checked")
    checked = report.get("outer", {})
    figure = plot_risk_coverage(curve, f"{winner}: {len(champion_outer)} outer images",
                                checked)
    values = {k: checked[k] for k in ("coverage", "mean_set_size", "referred_share",
                                      "accepted_accuracy") if k in checked}
    values.update({f"coverage.{c}": v for c, v in checked.get("coverage_per_class", {}).items()})
    metrics = {k: {"value": float(v), "step": 0} for k, v in values.items()
               if np.isfinite(float(v))}
    return report, curve, figure, metrics


# --------------------------------------------------------------------------- the champion


def _refit_space(winner: str, params: SelectModelParams, floor: FloorParams) -> SelectedFloor:
    """The winner's search, refitted on every training patient: the selected floor's space, or
    the cross-validation floor's (its scale, its 101 numbers, its RBF SVM grid)."""
    if winner == "selected_floor":
        s = params.floor
        return SelectedFloor(s.scales, s.feature_sets, s.heads, s.inner_folds, s.calibration,
                             seed=params.seed)
    return SelectedFloor([floor.downscale], [list(CORE_GROUPS)],
                         {"svm": {"C": floor.c_grid, "gamma_factor": floor.gamma_factors}},
                         floor.inner_folds, floor.calibration, seed=params.seed)


def refit_champion(model_selection: pd.DataFrame, calibration: dict[str, Any],
                   selection_predictions: pd.DataFrame, cv_folds: pd.DataFrame,
                   raw_images: Path, tiles: Any, params: SelectModelParams,
                   cross_validation: CrossValidationParams, predict: PredictParams,
                   **cv_ensembles: Any) -> tuple[Any, dict[str, Any], pd.DataFrame]:
    """The winner for every training (cross-validated) patient, its prediction sets attached,
    scored once on the outer patients nobody chose on; returns (model, outer scores, its
    probabilities of the outer images). A classical winner is refitted on all of them (its
    search included); a CNN winner is its cross-validation's fold ensemble
    (``<model>.cv_ensemble``: K models that together saw every training patient, each
    validated on patients it did not train on), since a further CNN trained on everything
    would have no held-out patients to stop or calibrate on; the hybrid is its meta-learner
    fitted on every out-of-fold row of its bases, over those bases served as above
    (``serving.hybrid``)."""
    winner = str(model_selection.loc[model_selection["chosen"], "model"].iloc[0])
    is_cv = (cv_folds["role"] == CV).to_numpy()
    train, outer = cv_folds[is_cv], cv_folds[~is_cv]

    def served(name: str) -> tuple[Any, dict[str, Any]]:
        return _served_model(name, train, Path(raw_images), tiles, params,
                             cross_validation, cv_ensembles)

    if families.family(winner).kind == "hybrid":
        hp = params.hybrid
        frames = {b: selection_predictions[selection_predictions["model"] == b]
                  for b in hp.bases}
        classes = _classes(frames[hp.bases[0]])
        held, base_prob = _aligned(frames, hp.bases, HELD_OUT, classes)
        meta = StackedHybrid(hp.bases, hp.meta, hp.inner_folds, seed=params.seed).fit(
            base_prob, held["label"], held["group"])
        bases = {b: served(b)[0] for b in hp.bases}
        record = Preprocessing.from_store(tiles).model_copy(update={
            "architecture": winner, "classes": tuple(meta.classes_), "stain_reference": None,
            "temperature": None})
        champion = HybridImageModel(meta, bases, record, predict)
        scores: dict[str, Any] = {"model": winner, "train_images": len(train),
                                  "chosen": f"{meta.chosen_[0]} {meta.chosen_[1]} over "
                                            f"{', '.join(hp.bases)}",
                                  "inner_cv_f1": meta.cv_score_}
    else:
        champion, scores = served(winner)
    champion.preprocessing = preprocessing_of(champion).with_conformal(
        calibration["calibration"])
    classes = [str(c) for c in preprocessing_of(champion).classes]
    frame = pd.DataFrame(columns=["model", "fold", "set", *KEYS,
                                  *(probability_column(c) for c in classes), "predicted"])
    if len(outer):
        frame = _champion_rows(champion, outer, Path(raw_images), winner, predict)
        scores.update({f"outer_{k}": v for k, v in _pooled(frame, classes, params).items()})
        scores["outer_images"] = len(frame)
        logger.info("Champion %s on %d outer images: macro-F1 %.3f [%.3f-%.3f]", winner,
                    len(frame), scores["outer_f1"], scores["outer_low"], scores["outer_high"])
    return champion, scores, frame


def _served_model(name: str, train: pd.DataFrame, raw_images: Path, tiles: Any,
                  params: SelectModelParams, cross_validation: CrossValidationParams,
                  cv_ensembles: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """One family's model for every training patient, and what to say of it: a CNN's fold
    ensemble, or a classical model refitted (its search included)."""
    if families.family(name).kind == "cnn":
        if name not in cv_ensembles:
            raise ModelError(f"select_model: '{name}' has no fold ensemble in this run",
                             hint=f"run the whole pipeline (`kedro run --pipeline="
                                  f"select_model`), which cross-validates {name}")
        return cv_ensembles[name], {"model": name, "train_images": len(train),
                                    "chosen": f"the fold ensemble of {name}",
                                    "inner_cv_f1": float("nan")}
    model = _refit_space(name, params, cross_validation.floor).fit_images(
        [raw_images / p for p in train["image_path"]], train["label"], train["group"])
    record = Preprocessing.from_store(tiles).model_copy(update={
        "architecture": name, "classes": tuple(model.classes_), "stain_reference": None,
        "temperature": None})
    return ClassicalImageModel(model, record), {
        "model": name, "chosen": model.chosen_.describe(), "inner_cv_f1": model.cv_score_,
        "train_images": len(train)}


def _champion_rows(champion: Any, outer: pd.DataFrame, raw_images: Path, winner: str,
                   predict: PredictParams) -> pd.DataFrame:
    """The champion's probabilities of the outer images, through the code that serves it (tiles,
    tissue checks, Grad-CAM off); images it rejects are errors here, not silently dropped."""
    settings = predict.model_copy(update={"gradcam": False, "tta": False, "workers": 1})
    files = [(str(p), raw_images / p) for p in outer["image_path"]]
    answers, _ = predict_files(files, champion, settings)
    classes = [str(c) for c in preprocessing_of(champion).classes]
    cols = [probability_column(c) for c in classes]
    failed = answers[answers[cols].isna().any(axis=1)]
    if len(failed):
        raise DataError(f"select_model: the champion could not classify {len(failed)} outer "
                        f"image(s), e.g. {failed['file'].iloc[0]}")
    prob = answers.set_index("file").loc[[f for f, _ in files], cols].to_numpy(float)
    return _rows(outer, prob, classes, winner, -1, OUTER)


def champion_card(model_selection: pd.DataFrame, scores: dict[str, Any],
                  prediction_sets: dict[str, Any], params: SelectModelParams) -> str:
    """The champion's model card: what won, how it was chosen, its outer score and what its
    prediction sets did there."""
    def f(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, (int, float)) and np.isfinite(v) else "-"

    lines = [f"# Model card: {scores['model']} (selection champion)", "",
             f"Chosen among {len(model_selection)} candidates on the same grouped folds "
             f"(tie rule `{params.tie_rule}`), refitted on {scores['train_images']} training "
             f"images: {scores['chosen']} (inner CV macro-F1 {f(scores['inner_cv_f1'])}).", ""]
    if "outer_f1" in scores:
        lines += [f"Outer patients ({scores['outer_images']} images, chosen on by nobody): "
                  f"macro-F1 {f(scores['outer_f1'])} [{f(scores['outer_low'])}-"
                  f"{f(scores['outer_high'])}], accuracy {f(scores['outer_accuracy'])}.", ""]
    outer = prediction_sets.get("outer")
    if outer:
        lines += [*unsure_section(prediction_sets["coverage_target"],
                                  prediction_sets["calibration_images"], "out-of-fold images",
                                  outer, "the outer patients")[:-1],
                  "The accuracy of the accepted images against the share referred: "
                  "`risk_coverage.png` (and `.csv`) beside this card in MLflow.", ""]
    lines += ["## Selection", "", selection_markdown(model_selection, params)
              .split("\n", 2)[2]]
    return "\n".join(lines)


def register_champion(champion: Any, scores: dict[str, Any], card: str,
                      predict: PredictParams, experiment: str = "neuroblastoma_cnn") -> str:
    """Logs the *saved* champion (``champion.model_source``: the catalog's file) as the
    raw-image pyfunc, registers it as ``<experiment>-select_model`` and gives it the alias
    ``champion`` with its model card as the version's description; returns the model URI.
    Without an active MLflow run (MLflow off) nothing is logged."""
    import mlflow  # noqa: PLC0415  (lazy: MLflow)

    run = mlflow.active_run()
    if run is None:
        logger.warning("select_model: no active MLflow run; champion saved, not registered")
        return ""
    uri = log_raw_image_model(champion.model_source, predict, name="champion_raw_images")
    name = registry.registered_name(
        mlflow.get_experiment(run.info.experiment_id).name or experiment, "select_model")
    client = mlflow.MlflowClient()
    version = mlflow.register_model(uri, name, tags={
        "family": scores["model"], "outer_f1": f"{scores.get('outer_f1', float('nan')):.6g}",
        "run_id": run.info.run_id}).version
    client.update_model_version(name, version, description=card)
    client.set_registered_model_alias(name, registry.CHAMPION, version)
    logger.info("Registered %s version %s: models:/%s@%s", name, version, name,
                registry.CHAMPION)
    return f"models:/{name}@{registry.CHAMPION}"
