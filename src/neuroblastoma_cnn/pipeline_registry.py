"""Project pipelines: the data stages, and one namespaced model half per model.

`training` and `evaluation` are templates: each model in MODELS (the model families that train,
read from `models/families.py`) gets its own copy under its namespace (`resnet34.train_model`,
`resnet34.model`, `params:resnet34.training`...), so the two ResNets share code and differ only
by parameters and catalog paths.

Why the folders are imported here rather than found with `find_pipelines`: since Kedro 1.x,
`find_pipelines` loads only the folders named on the command line (`--pipeline=NAME`), and the
composed pipelines below (`train_resnet34`...) are not folders but need several of them.
"""

from __future__ import annotations

from kedro.pipeline import Pipeline

from neuroblastoma_cnn.models import families
from neuroblastoma_cnn.models.families import Capability
from neuroblastoma_cnn.pipelines import (
    augmentation,
    cross_validation,
    evaluation,
    features,
    ingestion,
    predict,
    select_model,
    splitting,
    study,
    training,
)
from neuroblastoma_cnn.trials.trial import ProjectSteps

#: The models with their own training pipelines: the families that train (models/families.py).
MODELS = tuple(families.names(Capability.TRAIN))
#: Those whose `cross_validate_<model>` pipeline the registry builds.
CV_MODELS = tuple(families.names(Capability.TRAIN, Capability.CROSS_VALIDATE))
#: What `kedro run --pipeline=cross_validate` cross-validates (README "Cross-validation").
DEFAULT_CV_MODEL = "resnet34"
# Data-half outputs the model halves read under their plain (shared) names.
SHARED_INPUTS = {"augmented_train_tiles", "tiles", "split_table", "run_context", "raw_images"}


def model_pipeline(model: str) -> Pipeline:
    """Training + evaluation for one model, namespaced by the model's name."""
    return Pipeline(
        [training.create_pipeline(), evaluation.create_pipeline()],
        namespace=model,
        inputs=SHARED_INPUTS,
        parameters={"params:evaluation", "params:cross_validation"},
    )


def features_pipeline(model: str, in_run: bool = False) -> Pipeline:
    """CNN features + scikit-learn heads for one model, in the model's namespace.

    ``in_run``: on the model trained in the same run (`<model>.model`); otherwise on the model
    `params:features.extractors.<model>` selects among `trained_models` (latest by default).
    """
    parameters = {"params:features.extraction": "params:features.extraction",
                  "params:features.heads": "params:features.heads",
                  "params:evaluation": "params:evaluation"}
    inputs = {"tiles", "split_table"}
    if not in_run:
        parameters["params:extractor"] = f"params:features.extractors.{model}"
        inputs.add("trained_models")
    return Pipeline(features.create_pipeline(in_run=in_run), namespace=model, inputs=inputs,
                    parameters=parameters)


def project_steps() -> ProjectSteps:
    """The training and evaluation node functions that studies and folds run."""
    return ProjectSteps(
        training.nodes.train_model, evaluation.nodes.predict_split_tiles,
        evaluation.nodes.aggregate_image_predictions, evaluation.nodes.compute_test_metrics)


def cv_pipeline(model: str) -> Pipeline:
    """One model's cross-validation (folds, ensemble, report) in the model's namespace."""
    return Pipeline(
        cross_validation.create_pipeline(project_steps(), model), namespace=model,
        inputs={"tiles", "split_table", "cv_folds", "cv_floor_predictions", "run_context"},
        parameters={"params:evaluation", "params:cross_validation"},
    )


def register_pipelines() -> dict[str, Pipeline]:
    """`ingestion`, `splitting`, `augmentation`, `data_processing`, `<model>` (model half only),
    `train_<model>` (raw images to a logged model) for each model, `__default__` (all of
    those), and `predict` (new images with a trained model; not in `__default__`, since it
    needs a trained model and images to classify). `<model>_features` (CNN features +
    scikit-learn heads on a trained model) and `train_<model>_features` (raw images to CNN to
    heads in one run) are not in `__default__` either: an extra technique, run on demand."""
    pipelines: dict[str, Pipeline] = {
        "ingestion": ingestion.create_pipeline(),
        "splitting": splitting.create_pipeline(),
        "augmentation": augmentation.create_pipeline(),
    }
    data = pipelines["ingestion"] + pipelines["splitting"] + pipelines["augmentation"]
    pipelines["data_processing"] = data
    everything = data
    for model in MODELS:
        half = model_pipeline(model)
        pipelines[model] = half
        pipelines[f"train_{model}"] = data + half
        pipelines[f"{model}_features"] = features_pipeline(model)
        pipelines[f"train_{model}_features"] = data + half + features_pipeline(model, in_run=True)
        everything += half
    pipelines["__default__"] = everything
    pipelines["predict"] = predict.create_pipeline()
    # Studies train many models with the training and evaluation functions (not in __default__).
    pipelines["study"] = study.create_pipeline(project_steps(), models=MODELS)
    # Cross-validation: raw images to K folds, the floor on them, the ensemble and the report.
    folds = (pipelines["ingestion"] + pipelines["splitting"]
             + cross_validation.create_data_pipeline())
    for model in CV_MODELS:
        pipelines[f"cross_validate_{model}"] = folds + cv_pipeline(model)
    pipelines["cross_validate"] = pipelines[f"cross_validate_{DEFAULT_CV_MODEL}"]
    # Model selection: the same folds, the CNNs it trains itself (finished folds reused), the
    # selected floor, the hybrid, the ranking and the winner's prediction sets.
    cnns = select_model.nodes.SELF_TRAINED_CNNS
    selection = folds
    for model in cnns:
        selection += cv_pipeline(model)
    pipelines["select_model"] = selection + select_model.create_pipeline(cnn_models=cnns)
    # The classical candidates only (no CNN trained): for `candidates` without a CNN.
    pipelines["select_model_classical"] = folds + select_model.create_pipeline()
    return pipelines
