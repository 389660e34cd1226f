"""The model card's content: counts (no patient names), preprocessing, recipe, test metrics
with their interval, calibration, intended use, limitations and the command that reproduces it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from _params import params, store_metadata
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Node, Pipeline

from neuroblastoma_cnn.analysis.model_card import (
    build_model_card,
    kept_epoch,
    markdown_to_html,
)
from neuroblastoma_cnn.hooks import RunContextHook, kedro_command, run_context
from neuroblastoma_cnn.images.preprocessing import Preprocessing

CLASSES = ["Benign", "InSitu"]


def _inputs():
    summary = pd.DataFrame({
        "split": ["train", "train", "validation", "validation", "test", "test"],
        "label": CLASSES * 3, "groups": [5, 4, 1, 1, 2, 2], "images": [20, 16, 4, 4, 8, 7],
        "tiles": [80, 64, 16, 16, 32, 28]})
    history = pd.DataFrame({"epoch": [1, 2, 3], "val_image_macro_f1": [0.4, 0.7, 0.6],
                            "val_loss": [1.0, 0.8, 0.9]})
    metrics = {
        "f1_macro": 0.8125, "accuracy": 0.8, "balanced_accuracy": 0.79,
        "macro_f1_ci": {"low": 0.61, "high": 0.95, "point": 0.8125},
        "n_test_images": 15, "n_test_groups": 4,
        "per_class": {c: {"precision": 0.8, "recall": 0.8, "f1": 0.8, "support": 7}
                      for c in CLASSES},
        "calibration": {"temperature": 1.8, "applied": True, "validation_ece_before": 0.21,
                        "validation_ece_after": 0.07, "ece_before": 0.19, "ece_after": 0.09},
    }
    record = Preprocessing.from_metadata(store_metadata(CLASSES, 224, tile_size=512), "t")
    return metrics, history, summary, record


def test_card_says_what_how_how_well_and_how_to_reproduce():
    metrics, history, summary, record = _inputs()
    context = {"command": "kedro run --pipeline=train_resnet34 --env=tiny",
               "git_commit": "abc123", "session_id": "2026-12-07T05.00.00.000Z",
               "model": "resnet34"}
    card = build_model_card(metrics, history, summary, record, params("resnet34.model"),
                            params("resnet34.training"), params("evaluation"), context)
    assert card.startswith("# Model card: resnet34")
    assert "| Benign | 20 / 5 | 4 / 1 | 8 / 2 |" in card  # images / groups per split
    assert "512 px tiles every 512 px" in card and "224 x 224 RGB" in card
    assert "stain normalisation | none" in card
    assert "| architecture | resnet34 (from scratch) |" in card
    assert "adamw, lr 0.001" in card and "| epochs (maximum / run) | 50 / 3 |" in card
    assert "| kept epoch | 2 (best val_image_macro_f1) |" in card
    assert "Macro-F1 **0.812** (95% interval 0.610-0.950, 1000 resamples of patient groups)" \
        in card
    assert "T = 1.800" in card and "| test | 0.190 | 0.090 |" in card
    assert "Research use only, not for diagnosis" in card and "## Known limitations" in card
    assert "kedro run --pipeline=train_resnet34 --env=tiny" in card and "`abc123`" in card
    page = markdown_to_html(card)
    assert "<td>Benign</td><td>20 / 5</td>" in page and "<strong>0.812</strong>" in page
    assert "<pre><code>kedro run --pipeline=train_resnet34 --env=tiny</code></pre>" in page


def test_kept_epoch_follows_the_monitor_and_its_window():
    _, history, *_ = _inputs()
    assert kept_epoch(history, params("resnet34.training", monitor="val_loss")) == 2
    assert kept_epoch(history, params("resnet34.training", monitor_window=2)) == 3  # 0.65 > 0.55


def test_command_is_rebuilt_from_the_session_run_parameters(tmp_path: Path):
    run_params = {"pipeline_names": ["train_resnet34"], "env": "tiny", "tags": None,
                  "runtime_params": {"resnet34": {"training": {"epochs": 3}},
                                     "evaluation.temperature_scaling": True},
                  "load_versions": {}, "run_id": "s1"}
    assert kedro_command(run_params) == (
        "kedro run --pipeline=train_resnet34 --env=tiny "
        "--params=resnet34.training.epochs=3,evaluation.temperature_scaling=True")
    context = run_context(run_params, tmp_path)  # not a git checkout
    assert context["git_commit"] == "unknown" and context["session_id"] == "s1"


def test_the_hook_fills_the_declared_run_context_without_replacing_it(tmp_path: Path, caplog):
    catalog = DataCatalog({"run_context": MemoryDataset()})
    pipeline = Pipeline([Node(lambda c: c, "run_context", "out", name="card")])
    hook = RunContextHook()
    hook._project_path = tmp_path
    hook.before_pipeline_run({"pipeline_names": ["resnet34"], "run_id": "s2"}, pipeline, catalog)
    assert catalog.load("run_context")["command"] == "kedro run --pipeline=resnet34"
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
