"""The MLflow UI as a user meets it after training: the README's store, served by `mlflow server`,
shows each run with its parameters, per-epoch metric history, figures and the logged model.

Everything is read through the server's REST API (what the UI itself calls), not the Python
client. The runs' artifacts live in the project's mlartifacts/ folder: the experiment was created
with that absolute location (conf/base/mlflow.yml), so the server needs no artifact flags.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from urllib.request import Request, urlopen

import pytest
from _browser import Page, assert_not_blank, copy_to_docs, free_port, serving
from _tiny_project import TrainedProject, run_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXPERIMENT = "neuroblastoma_cnn_tiny"
MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def _get(base: str, endpoint: str, **query: str) -> Any:
    with urlopen(f"{base}{endpoint}?{urlencode(query)}", timeout=30) as response:
        return json.load(response)


def _post(base: str, endpoint: str, body: dict[str, Any]) -> Any:
    request = Request(f"{base}{endpoint}", data=json.dumps(body).encode(), method="POST",
                      headers={"Content-Type": "application/json"})
    with urlopen(request, timeout=30) as response:
        return json.load(response)


def _run(base: str, experiment_id: str, name: str) -> dict[str, Any]:
    found = _post(base, "/api/2.0/mlflow/runs/search", {
        "experiment_ids": [experiment_id], "filter": f"attributes.run_name = '{name}'"})
    runs = found.get("runs", [])
    assert len(runs) == 1, f"expected one run named {name}, got {len(runs)}"
    return runs[0]


def _without_assistant(page: Page, base: str) -> None:
    """Marks the assistant panel as seen once, so it does not open by itself over the page."""
    page.open(f"{base}/health", ready="document.readyState === 'complete'")
    page.evaluate("localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true')")


def test_mlflow_server_shows_runs_metrics_figures_and_models(trained: TrainedProject,
                                                             tmp_path: Path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [MLFLOW, "server", "--backend-store-uri", "sqlite:///mlflow.db",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # Background job workers serve GenAI features only: off, for a lighter server.
    env = run_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with serving(command, f"{base}/health", trained.path, tmp_path / "mlflow.log", env=env):
        experiment = _get(base, "/api/2.0/mlflow/experiments/get-by-name",
                          experiment_name=EXPERIMENT)["experiment"]
        assert experiment["artifact_location"] == (trained.path / "mlartifacts").resolve().as_uri()

        for pipeline, model, epochs in (("train_resnet34", "resnet34", 2),
                                        ("resnet50", "resnet50", 3)):  # 2 head + 1 fine-tune
            run = _run(base, experiment["experiment_id"], pipeline)
            run_id = run["info"]["run_id"]
            assert run["info"]["status"] == "FINISHED"
            params = {p["key"]: p["value"] for p in run["data"]["params"]}
            tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
            metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
            assert params[f"{model}.model.architecture"] == model
            assert f"{model}.training.learning_rate" in params
            assert 0.0 <= metrics[f"{model}.test_f1_macro"] <= 1.0

            history = _get(base, "/api/2.0/mlflow/metrics/get-history", run_id=run_id,
                           metric_key=f"{model}.val_macro_f1")["metrics"]
            assert [h["step"] for h in history] == list(range(1, epochs + 1))

            listed = _get(base, "/api/2.0/mlflow/artifacts/list", run_id=run_id, path=model)
            files = {f["path"] for f in listed["files"]}
            for name in ("confusion_matrix.png", "confusion_matrix.csv", "training_curves.png",
                         "classification_report.csv", "test_metrics.json"):
                assert f"{model}/{name}" in files, sorted(files)
            with urlopen(f"{base}/get-artifact?" + urlencode(
                    {"path": f"{model}/confusion_matrix.png", "run_uuid": run_id}),
                    timeout=30) as response:
                assert response.read(8) == b"\x89PNG\r\n\x1a\n"

            # The logged model: found from the run's tag, produced by this run, ready to load.
            model_id = tags[f"{model}.model_uri"].removeprefix("models:/")
            logged = _get(base, f"/api/2.0/mlflow/logged-models/{model_id}")["model"]["info"]
            assert logged["source_run_id"] == run_id
            assert logged["status"] == "LOGGED_MODEL_READY"
            model_files = _get(base, f"/api/2.0/mlflow/logged-models/{model_id}/artifacts/"
                                     "directories", artifact_directory_path="")["files"]
            assert "MLmodel" in {f["path"] for f in model_files}

        # The UI draws the run page: the model-metrics charts of the resnet34 run.
        run_id = _run(base, experiment["experiment_id"], "train_resnet34")["info"]["run_id"]
        with Page(tmp_path / "chromium") as page:
            _without_assistant(page, base)
            page.open(f"{base}/#/experiments/{experiment['experiment_id']}/runs/{run_id}/"
                      "model-metrics?workflowType=machine_learning",
                      ready="document.querySelectorAll('.main-svg').length >= 6")
            dom = page.dom()
            png = page.screenshot(tmp_path / "mlflow-run.png")
    for text in ("train_resnet34", "resnet34.accuracy", "resnet34.loss", "Model metrics"):
        assert text in dom, f"run page lacks {text!r}"
    assert_not_blank(png)
    copy_to_docs(tmp_path / "mlflow-run.png", "mlflow-run.png")


def test_mlflow_ui_shows_the_model_card_and_the_registered_model(trained: TrainedProject,
                                                                  tmp_path: Path):
    """Issue 21 as a user sees it: the run's model card drawn in the artifact viewer, and the
    registered raw-image model with its metric tags and the ``champion`` alias."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [MLFLOW, "server", "--backend-store-uri", "sqlite:///mlflow.db",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = run_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    name = f"{EXPERIMENT}-resnet34"
    with serving(command, f"{base}/health", trained.path, tmp_path / "mlflow.log", env=env):
        experiment = _get(base, "/api/2.0/mlflow/experiments/get-by-name",
                          experiment_name=EXPERIMENT)["experiment"]
        run_id = _run(base, experiment["experiment_id"], "train_resnet34")["info"]["run_id"]
        version = _get(base, "/api/2.0/mlflow/model-versions/get", name=name,
                       version="1")["model_version"]
        assert version["run_id"] == run_id
        tags = {t["key"]: t["value"] for t in version["tags"]}
        assert {"test_f1_macro", "test_ece_before", "temperature"} <= set(tags)
        with Page(tmp_path / "chromium") as page:
            _without_assistant(page, base)
            page.open(f"{base}/#/experiments/{experiment['experiment_id']}/runs/{run_id}/"
                      "artifacts/resnet34/model_card.html",
                      ready="document.querySelector('iframe.mlflow-html-iframe') !== null")
            card = str(page.evaluate(  # the viewer shows the HTML from a blob URL, sandboxed
                "fetch(document.querySelector('iframe.mlflow-html-iframe').src)"
                ".then(r => r.text())"))
            card_png = page.screenshot(tmp_path / "mlflow-model-card.png")
            page.open(f"{base}/#/models/{name}",
                      ready="document.body.innerText.includes('test_f1_macro')")
            registry_text = str(page.evaluate("document.body.innerText"))
            registry_png = page.screenshot(tmp_path / "mlflow-registered-model.png")
    assert "Model card: resnet34" in card and "not for diagnosis" in card
    assert "Version 1" in registry_text and "test_ece_before" in registry_text
    # The alias is drawn beside the version exactly when the rules gave it to this version.
    shown = registry_text.count("champion") > registry_text.count("champion_at_registration")
    assert shown == (tags["champion_at_registration"] == "yes")
    for png in (card_png, registry_png):  # (docs/ shows the same pages from a BACH run)
        assert_not_blank(png)
