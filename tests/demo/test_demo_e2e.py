"""The demo as a new user runs it: `kedro run --env=demo ...` in a fresh project, end to end.

The archive is a Kather-shaped zip made from BACH tissue (class folders named like Kather's,
slides spanning classes), served on loopback; the demo's URL and MD5 are pointed at it with
`--params`, and sizes are cut so that training takes seconds. Nothing reaches the internet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from _kather_like import ARCHIVE_NAME, TOP, make_kather_like, serve, zip_folder
from _params import environment_parameters
from _tiny_project import KEDRO, latest, make_project, run_env
from conftest import _require_bach

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLI = str(Path(sys.executable).with_name("neuroblastoma-cnn"))
KATHER_FOLDERS = ("01_TUMOR", "02_STROMA", "03_COMPLEX", "04_LYMPHO")
N_SLIDES = 5
TINY = ("ingestion.input_size=32,ingestion.max_images_per_class=8,"
        "resnet34.training.epochs=1,resnet34.training.batch_size=8,"
        "evaluation.bootstrap_samples=20,splitting.n_folds=2,predict.gradcam_max_side=64")
TINY_STAGES = environment_parameters("tiny")["resnet34"]["model"]["stages"]


@pytest.fixture(scope="module")
def served_zip(tmp_path_factory: pytest.TempPathFactory):
    """(folder holding the zip, its MD5): 4 classes x 5 images x 2 tiles over 5 slides."""
    bach = _require_bach()
    work = tmp_path_factory.mktemp("kather_like_e2e")
    make_kather_like(work / "tree", bach, images_per_class=5, n_slides=N_SLIDES,
                     tiles_per_image=2, folder_names=KATHER_FOLDERS)
    www = work / "www"
    www.mkdir()
    return www, zip_folder(work / "tree", www / ARCHIVE_NAME)


def env() -> dict[str, str]:
    variables = run_env(NO_PROXY="127.0.0.1,localhost")
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                 "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        variables.pop(name, None)
    return variables


def run(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), cwd=project, env=env(), capture_output=True, text=True,
                            timeout=900, check=False)
    assert result.returncode == 0, f"{args[:4]} failed:\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-3000:]}"
    return result


@pytest.fixture
def demo_project(tmp_path: Path) -> Path:
    """A fresh project as cloned: no raw images, its own MLflow store."""
    project = make_project(tmp_path / "project", with_images=False)
    with (project / "conf" / "demo" / "mlflow.yml").open("a") as conf:
        conf.write(f"\nserver:\n  mlflow_tracking_uri: sqlite:///{project / 'mlflow.db'}\n")
    # The tiny environment's two-block network (a list, which --params cannot carry).
    parameters = project / "conf" / "demo" / "parameters.yml"
    text = parameters.read_text()
    assert "\nresnet34:\n  training:" in text, "the demo's resnet34 block moved: update the test"
    parameters.write_text(text.replace("\nresnet34:\n", "\nresnet34:\n  model:\n    stages: "
                                       f"{TINY_STAGES}\n", 1))
    return project


def test_demo_downloads_once_trains_evaluates_and_predicts(demo_project: Path,
                                                           served_zip) -> None:
    www, md5 = served_zip
    data = demo_project / "data"
    with serve(www) as server:
        params = f"demo.url={server.url}/{ARCHIVE_NAME},demo.md5=md5:{md5},{TINY}"
        first = run(demo_project, KEDRO, "run", "--env=demo", "--pipeline=train_resnet34",
                    "--params", params)
        assert server.requests == [f"/{ARCHIVE_NAME}"], first.stdout[-2000:]

        # the slide is the group, parsed from the file names; no slide is in two splits
        split = pd.read_csv(latest(data / "05_model_input" / "split_table.csv"),
                            dtype={"group": str, "label": str})
        assert set(split["group"]) == {f"CRC-Prim-HE-{i + 1:02d}" for i in range(N_SLIDES)}
        assert (split.groupby("group")["split"].nunique() == 1).all()
        assert set(split["split"]) == {"train", "validation", "test"}
        assert split.groupby("label").size().to_dict() == dict.fromkeys(KATHER_FOLDERS, 8)
        summary = pd.read_csv(latest(data / "08_reporting" / "split_summary.csv"))
        assert {"target_share", "share_gap"} <= set(summary.columns)
        metrics = json.loads(latest(data / "08_reporting" / "resnet34" / "test_metrics.json")
                             .read_text())
        assert metrics["n_test_images"] == int((split["split"] == "test").sum())
        assert (data / "01_raw" / "kather_2016" / "README.md").read_text().count("CC BY 4.0")

        # a second run uses the verified copy: no request
        run(demo_project, KEDRO, "run", "--env=demo", "--pipeline=ingestion", "--params", params)
        assert server.requests == [f"/{ARCHIVE_NAME}"]

        # the demo model classifies the demo's tumour tiles, through Kedro and the CLI
        run(demo_project, KEDRO, "run", "--env=demo", "--pipeline=predict", "--params", params)
        assert server.requests == [f"/{ARCHIVE_NAME}"]
    tumour = data / "01_raw" / "kather_2016" / TOP / "01_TUMOR"
    n_tumour = len(list(tumour.glob("*.tif")))
    predictions = pd.read_csv(latest(data / "07_model_output" / "predictions.csv"))
    assert len(predictions) == n_tumour == 10
    assert set(predictions["predicted"]) <= set(KATHER_FOLDERS)
    assert len(list(latest(data / "08_reporting" / "gradcam").rglob("*.png"))) == n_tumour

    out = demo_project / "stroma_predictions.csv"
    run(demo_project, CLI, "predict", str(tumour.parent / "02_STROMA"), "-o", str(out))
    cli = pd.read_csv(out)
    assert len(cli) == 10 and set(cli["predicted"]) <= set(KATHER_FOLDERS)


def test_without_images_and_without_demo_one_line_points_to_the_demo(tmp_path: Path) -> None:
    project = make_project(tmp_path / "project", with_images=False)
    result = subprocess.run([KEDRO, "run", "--pipeline=train_resnet34"], cwd=project, env=env(),
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output[-3000:]
    assert "kedro run --env=demo" in errors[0]
    assert "data/01_raw/images" in errors[0] and "<Class>/<Patient>/<image>" in errors[0]
    assert "Traceback" not in output
    assert os.listdir(project / "data" / "02_intermediate") == []  # nothing ran
