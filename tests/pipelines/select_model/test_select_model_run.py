"""`kedro run --pipeline=select_model_classical --env=tiny` on the BACH subset: a deliberately
better family wins, is refitted, saved, registered with the alias `champion` and served with
prediction sets; the table is versioned."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
from _tiny_project import latest

from neuroblastoma_cnn.datasets import TrainedModels

pytestmark = pytest.mark.integration


def test_a_better_family_wins_and_is_registered_as_champion(kedro_project: Path, run_kedro):
    # The floor is made useless (an SVM that cannot separate anything), so the selected floor
    # must win on the same folds, whatever the tie rule.
    run_kedro("select_model_classical", runtime_params={
        "select_model": {"candidates": ["floor", "selected_floor"], "tie_rule": "best"},
        "cross_validation": {"n_folds": 2,
                             "floor": {"c_grid": [1e-6], "gamma_factors": [1e-6]}}})
    data = kedro_project / "data"
    table = pd.read_csv(latest(data / "08_reporting" / "model_selection.csv"))
    assert table.loc[table["chosen"], "model"].tolist() == ["selected_floor"]
    assert table.set_index("model").loc["selected_floor", "pooled_f1"] > \
        table.set_index("model").loc["floor", "pooled_f1"]
    assert latest(data / "08_reporting" / "model_selection.md").read_text().count("**yes**") == 1
    assert latest(data / "08_reporting" / "risk_coverage.png").stat().st_size > 0
    card = latest(data / "08_reporting" / "champion_model_card.md").read_text()
    assert "selected_floor" in card and "| floor |" in card
    uri = latest(data / "08_reporting" / "champion_uri.txt").read_text()
    assert uri.endswith("-select_model@champion")
    mlflow.set_tracking_uri(f"sqlite:///{kedro_project / 'mlflow.db'}")
    name = uri.removeprefix("models:/").split("@")[0]
    version = mlflow.MlflowClient().get_model_version_by_alias(name, "champion")
    assert "Model card" in version.description
    champion = TrainedModels().load(uri)
    images = sorted((kedro_project / "data" / "01_raw" / "images").rglob("*.*"))[:2]
    from _params import params  # noqa: PLC0415

    from neuroblastoma_cnn.pipelines.predict import nodes  # noqa: PLC0415

    predictions, _ = nodes.predict_files([(p.name, p) for p in images], champion,
                                         params("predict", workers=1))
    assert {"prediction_set", "refer"} <= set(predictions.columns)


def test_an_unknown_candidate_stops_the_run_before_anything_is_written(kedro_project: Path,
                                                                      run_kedro):
    from neuroblastoma_cnn.core.errors import ParameterError  # noqa: PLC0415

    with pytest.raises(ParameterError, match=r"select_model\.candidates: Unknown model family "
                                             r"'resnet43'"):
        run_kedro("select_model_classical",
                  runtime_params={"select_model": {"candidates": ["floor", "resnet43"]}})
    assert not (kedro_project / "data" / "05_model_input" / "cv_folds.csv").exists()
    assert not (kedro_project / "data" / "02_intermediate" / "image_manifest.csv").exists()
