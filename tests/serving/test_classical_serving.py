"""A classical champion (selected floor) through every door a CNN goes through: saved and
loaded as a file, ``predict_files`` (the predict pipeline), the command line and the raw-image
pyfunc, with prediction sets; Grad-CAM says in one line that there is none."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from _params import params, store_metadata
from _synthetic_tissue import CLASSES, tissue
from click.testing import CliRunner
from PIL import Image

from neuroblastoma_cnn.analysis.conformal import ClassConditionalConformal
from neuroblastoma_cnn.cli.commands import main_group
from neuroblastoma_cnn.datasets import TrainedModels
from neuroblastoma_cnn.images.preprocessing import Preprocessing
from neuroblastoma_cnn.models.selected_floor import (
    ClassicalImageModel,
    SelectedFloor,
    save_classical,
)
from neuroblastoma_cnn.pipelines.predict import nodes
from neuroblastoma_cnn.serving.pyfunc import classify_encoded, log_raw_image_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A selected floor fitted on synthetic tissue (4 patients a class), calibrated and saved;
    and three new images to classify."""
    folder = tmp_path_factory.mktemp("classical")
    rng = np.random.default_rng(0)
    paths, labels, groups = [], [], []
    for label in CLASSES:
        for g in range(4):
            for i in range(2):
                path = folder / f"{label}{g}_{i}.png"
                Image.fromarray(tissue(label, rng)).save(path)
                paths, labels, groups = [*paths, path], [*labels, label], [*groups, f"{label}{g}"]
    floor = SelectedFloor([1], [["colour", "stain", "rgb"]], {"logistic": {"C": [1.0]}}, 2)
    floor.fit_images(paths, labels, groups)
    prob = floor.predict_proba_images(paths)
    calibration = ClassConditionalConformal(0.9).fit(prob, labels, floor.classes_,
                                                     groups).to_record()
    record = Preprocessing.from_metadata(store_metadata(floor.classes_, 16), "t").model_copy(
        update={"architecture": "selected_floor"}).with_conformal(calibration)
    model_file = folder / "champion" / "model.joblib"
    save_classical(ClassicalImageModel(floor, record), model_file)
    new = folder / "new"
    new.mkdir()
    for label in CLASSES:
        Image.fromarray(tissue(label, rng)).save(new / f"new_{label}.png")
    (new / "notes.txt").write_text("not an image")
    return model_file, sorted(new.iterdir())


def test_predict_files_and_the_pipeline_take_a_classical_model(saved, caplog) -> None:
    model_file, files = saved
    model = TrainedModels().load(str(model_file))
    settings = params("predict", workers=1)
    predictions, tiles = nodes.predict_files([(p.name, p) for p in files], model, settings)
    assert tiles.empty and len(predictions) == len(files)
    used = predictions[~predictions["rejected"]]
    assert len(used) == len(CLASSES) and (used["n_tiles"] == 0).all()
    np.testing.assert_allclose(used[[f"prob_{c}" for c in model.floor.classes_]].sum(axis=1), 1)
    assert used["prediction_set"].str.len().gt(0).any()
    assert predictions.loc[predictions["rejected"], "refer"].all()
    with caplog.at_level(logging.INFO):
        assert nodes.gradcam_overlays([(p.name, p) for p in files], model, predictions,
                                      settings, tiles) == {}
    assert any("no convolutions" in r.getMessage() for r in caplog.records)


def test_the_command_line_and_the_pyfunc_take_it(saved, tmp_path) -> None:
    model_file, files = saved
    out = tmp_path / "predictions.csv"
    result = CliRunner().invoke(main_group, ["predict", "-m", str(model_file), "-o", str(out),
                                             str(files[0].parent)])
    assert result.exit_code in (0, 3), result.output  # 3: a file was rejected (notes.txt)
    table = pd.read_csv(out, keep_default_na=False)
    assert {"prediction_set", "refer"} <= set(table.columns) and len(table) == len(files)
    assert "referred" in result.output
    frame = pd.DataFrame({"file": [files[0].name],
                          "image": [base64.b64encode(files[0].read_bytes()).decode()]})
    model = TrainedModels().load(str(model_file))
    answer = classify_encoded(frame, model, params("predict", workers=1))
    assert answer.loc[0, "error"] == "" and answer.loc[0, "prediction_set"]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("classical")
    with mlflow.start_run():
        uri = log_raw_image_model(model_file, params("predict"), name="champion_raw_images")
    served = mlflow.pyfunc.load_model(uri).predict(frame)
    # The URI through the project's own loader (`predict -m models:/...`), as a classical model.
    assert TrainedModels().load(uri).floor.classes_ == model.floor.classes_
    assert served.loc[0, "predicted"] == answer.loc[0, "predicted"]
    assert served.loc[0, "prediction_set"] == answer.loc[0, "prediction_set"]
