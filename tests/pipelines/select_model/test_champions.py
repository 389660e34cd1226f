"""A CNN that wins the selection becomes the champion as its fold ensemble, a winning hybrid its
meta-learner over its served bases: prediction sets attached, scored once on the outer
patients through the serving code, saved as one versioned file, registered with the alias
``champion`` and answered with sets, as a classical winner is. Built from the session's tiny
trained ResNet34 (no training here)."""

from __future__ import annotations

import base64
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
from _params import params, store_metadata
from _tiny_project import latest
from kedro.io.core import Version

from neuroblastoma_cnn.analysis.conformal import ClassConditionalConformal
from neuroblastoma_cnn.analysis.predictions import probability_column
from neuroblastoma_cnn.datasets import ChampionModelDataset, TrainedModels, load_keras_model
from neuroblastoma_cnn.models.ensemble import build_ensemble
from neuroblastoma_cnn.pipelines.select_model.nodes import (
    champion_card,
    choose_winner,
    prediction_set_report,
    refit_champion,
    register_champion,
)
from neuroblastoma_cnn.serving.tiles import predict_files

pytestmark = pytest.mark.slow


def _table(winner: str) -> pd.DataFrame:
    """A selection table (as rank_candidates writes it) in which ``winner`` was chosen."""
    rows = []
    for model, f1, cost in ((winner, 0.7, 4), ("floor", 0.5, 1)):
        rows.append({"model": model, "pooled_f1": f1, "pooled_ci_low": f1 - 0.05,
                     "pooled_ci_high": f1 + 0.05, "pooled_accuracy": f1, "folds_mean": f1,
                     "vs_best_mean_diff": 0.7 - f1, "vs_best_ci_low": 0.0,
                     "vs_best_ci_high": 0.0, "wins": 0, "losses": 0, "p_value": 1.0,
                     "cost": cost, "outer_images": 8, "servable": True,
                     "chosen": model == winner})
    return pd.DataFrame(rows)


@pytest.fixture
def selection(trained):
    """The trained project's images as 2 folds + 2 outer images a class, a two-member fold
    ensemble of its ResNet34, and a conformal calibration over random probabilities."""
    project = trained.path
    raw = project / "data" / "01_raw" / "images"
    model_file = latest(project / "data" / "06_models" / "resnet34" / "model.keras")
    ensemble = build_ensemble([load_keras_model(model_file) for _ in range(2)],
                              weights=[0.3, 0.7])  # two fold models (here the same weights)
    classes = [str(c) for c in ensemble.preprocessing.classes]
    images = sorted(p.relative_to(raw) for p in raw.rglob("*.png"))
    folds = pd.DataFrame({"image_path": [p.as_posix() for p in images],
                          "label": [p.parts[0] for p in images],
                          "group": [p.parts[1] for p in images]})
    outer = folds.groupby("label").head(2).index
    folds["role"] = np.where(folds.index.isin(outer), "outer", "cv")
    folds["fold"] = np.where(folds["role"] == "cv", folds.index % 2, -1)
    rng = np.random.default_rng(0)
    cv = folds[folds["role"] == "cv"]
    prob = rng.dirichlet(np.ones(len(classes)), len(cv))
    calibration = ClassConditionalConformal(0.8, min_images=4).fit(
        prob, cv["label"], classes, cv["group"]).to_record()
    sets = {"calibration": calibration, "coverage_target": 0.8,
            "calibration_images": len(cv)}
    return raw, ensemble, classes, folds, outer, sets


def _oof(folds: pd.DataFrame, classes: list[str], model: str, skill: float,
         seed: int) -> pd.DataFrame:
    """Held-out rows of a model putting ``skill`` extra logit on the true class."""
    cv = folds[folds["role"] == "cv"].reset_index(drop=True)
    logits = np.random.default_rng(seed).normal(0, 1, (len(cv), len(classes)))
    logits[np.arange(len(cv)), [classes.index(c) for c in cv["label"]]] += skill
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    frame = cv[["image_path", "label", "group", "fold"]].assign(model=model, set="held_out")
    for i, c in enumerate(classes):
        frame[probability_column(c)] = prob[:, i]
    return frame


def _card(winner: str, scores, sets, answered) -> str:
    """The champion's card, its sets checked on its own outer answers."""
    report, *_ = prediction_set_report({**sets, "model": winner}, answered)
    assert report["outer"]["n_images"] == len(answered)
    return champion_card(_table(winner), scores, report, params("select_model"))


def _registered(champion, scores, card, experiment, tmp_path, monkeypatch) -> str:
    """The champion registered in a throw-away MLflow store; its ``models:/...@champion``."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment(experiment)
    with mlflow.start_run():
        return register_champion(champion, scores, card, params("predict", workers=1),
                                 experiment=experiment)


def test_a_cnn_winner_is_served_as_its_fold_ensemble_with_prediction_sets(selection, tmp_path,
                                                                           monkeypatch):
    raw, ensemble, classes, folds, outer, sets = selection
    champion, scores, answered = refit_champion(
        _table("resnet34"), sets, pd.DataFrame(), folds, raw, None, params("select_model"),
        params("cross_validation"), params("predict", workers=1), resnet34=ensemble)
    card = _card("resnet34", scores, sets, answered)

    assert champion is ensemble and champion.preprocessing.conformal["coverage"] == 0.8
    assert scores["model"] == "resnet34" and scores["outer_images"] == len(outer)
    assert 0.0 <= scores["outer_f1"] <= 1.0 and "fold ensemble of resnet34" in card
    assert "## When the model is unsure" in card
    # Scored through the serving code: the same probabilities predict_files gives.
    answers, _ = predict_files([(p, raw / p) for p in folds.loc[outer, "image_path"]],
                               champion, params("predict", workers=1))
    cols = [probability_column(c) for c in classes]
    np.testing.assert_allclose(answered[cols].to_numpy(float), answers[cols].to_numpy(float),
                               rtol=1e-5)
    assert scores["outer_accuracy"] == pytest.approx(
        (answers["predicted"].to_numpy() == folds.loc[outer, "label"].to_numpy()).mean())

    dataset = ChampionModelDataset(str(tmp_path / "champion" / "model"), Version(None, None))
    dataset.save(champion)
    saved = list((tmp_path / "champion" / "model").rglob("*"))
    assert [p.name for p in saved if p.is_file()] == ["model.keras"]  # no partial file left
    loaded = ChampionModelDataset(str(tmp_path / "champion" / "model"),
                                  Version(None, None)).load()
    assert loaded.model_source.endswith("model.keras")
    assert loaded.preprocessing.conformal == champion.preprocessing.conformal

    uri = _registered(loaded, scores, card, "cnn_champion", tmp_path, monkeypatch)
    assert uri == "models:/cnn_champion-select_model@champion"
    served = TrainedModels().load(uri)
    answers, _ = predict_files([(p, raw / p) for p in folds.loc[outer, "image_path"]],
                               served, params("predict", workers=1))
    assert {"prediction_set", "refer"} <= set(answers.columns)
    assert answers[probability_column(classes[0])].notna().all()


def test_a_hybrid_winner_is_served_over_its_bases_with_prediction_sets(selection, tmp_path,
                                                                       monkeypatch):
    raw, ensemble, classes, folds, outer, sets = selection
    settings = params("select_model", hybrid={"bases": ["resnet34", "selected_floor"],
                                              "inner_folds": 2,
                                              "meta": {"logistic": {"C": [1.0]}}},
                      floor={"scales": [8], "feature_sets": [["rgb", "gradient"]],
                             "heads": {"logistic": {"C": [1.0]}}, "inner_folds": 2,
                             "calibration": "temperature"})
    oof = pd.concat([_oof(folds, classes, "resnet34", 1.0, 1),
                     _oof(folds, classes, "selected_floor", 2.0, 2)], ignore_index=True)
    tiles = SimpleNamespace(producer_metadata=store_metadata(classes, 32), path="tiles")
    champion, scores, answered = refit_champion(
        _table("hybrid"), sets, oof, folds, raw, tiles, settings, params("cross_validation"),
        params("predict", workers=1), resnet34=ensemble)
    card = _card("hybrid", scores, sets, answered)

    assert champion.kind == "hybrid" and champion.preprocessing.conformal["coverage"] == 0.8
    assert set(champion.bases) == {"resnet34", "selected_floor"}
    assert champion.bases["resnet34"] is ensemble
    assert scores["outer_images"] == len(outer) and "logistic" in scores["chosen"]
    dataset = ChampionModelDataset(str(tmp_path / "champion" / "model"), Version(None, None))
    dataset.save(champion)
    loaded = ChampionModelDataset(str(tmp_path / "champion" / "model"),
                                  Version(None, None)).load()
    assert loaded.model_source.endswith("model.joblib")
    files = [(p, raw / p) for p in folds.loc[outer, "image_path"]]
    before, _ = predict_files(files, champion, params("predict", workers=1))
    after, _ = predict_files(files, loaded, params("predict", workers=1))
    cols = [probability_column(c) for c in classes]
    np.testing.assert_allclose(after[cols].to_numpy(float), before[cols].to_numpy(float),
                               rtol=1e-5)  # the Keras base came back inside the .joblib
    assert {"prediction_set", "refer"} <= set(after.columns) and (after["n_tiles"] == 0).all()

    uri = _registered(loaded, scores, card, "hybrid_champion", tmp_path, monkeypatch)
    served = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({
        "file": [files[0][0]], "image": [base64.b64encode(files[0][1].read_bytes()).decode()]}))
    assert served["error"].iloc[0] == "" and served["prediction_set"].iloc[0]


def test_a_better_candidate_that_cannot_be_served_is_not_the_champion(caplog):
    table = _table("resnet34").assign(chosen=False)
    hybrid = table.iloc[[0]].assign(model="hybrid", pooled_f1=0.9, servable=False, cost=7)
    table = pd.concat([hybrid, table], ignore_index=True)
    assert choose_winner(table, "best") == "resnet34"
    assert "hybrid ranks first (pooled macro-F1 0.900) but cannot be served" in caplog.text
