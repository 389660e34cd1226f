"""Versioned scikit-learn heads (classifiers on CNN features), each also an MLflow child run.

A save writes one pickle holding ``{name: head bundle}`` (the fitted estimator plus the identity
of the feature extractor it was fitted on, see ``pipelines/features``) into a new version
folder, so a rerun never replaces heads that predictions may have been made with. With
``log_to_mlflow`` every head also becomes a child run of the active run: the scikit-learn
flavor with a signature, its chosen hyperparameters, its grouped-CV scores, and tags pointing
to the extractor model.

Pickles run code when loaded: load only heads this project wrote. :func:`head_classifier` finds
the newest saved head fitted on a given model (prediction's ``predict.head`` / ``--head``).
"""

from __future__ import annotations

import logging
import pickle
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import numpy as np
from kedro.io.core import DatasetError, Version

from neuroblastoma_cnn.core.errors import ModelError
from neuroblastoma_cnn.models import families
from neuroblastoma_cnn.models.feature_heads import (
    HeadClassifier,
    check_head_extractor,
    extractor_identity,
)

from .local_versioned import LocalVersionedDataset

logger = logging.getLogger(__name__)

MLFLOW_ARTIFACT_PATH = "model"
HEADS_FILE = "heads.pkl"


# ---------------------------------------------------------------------------------- storage


class SklearnHeadsDataset(LocalVersionedDataset):
    """``{name: bundle}`` in ``<filepath>/<version>/<file name>`` (pickle)."""

    def __init__(
        self,
        filepath: str,
        log_to_mlflow: bool = False,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
    ):
        self._log_to_mlflow = log_to_mlflow
        super().__init__(filepath, version, metadata)

    def _describe(self) -> dict[str, Any]:
        return {**super()._describe(), "log_to_mlflow": self._log_to_mlflow}

    def load(self) -> dict[str, dict[str, Any]]:
        return load_heads(self._load_path())

    def save(self, data: dict[str, dict[str, Any]]) -> None:
        if not isinstance(data, dict) or not all(
            isinstance(b, dict) and "model" in b for b in data.values()
        ):
            raise DatasetError("SklearnHeadsDataset saves {name: head bundle} dictionaries.")
        path = self._save_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            pickle.dump(data, handle, protocol=pickle.HIGHEST_PROTOCOL)
        if self._log_to_mlflow:
            log_heads_to_mlflow(data)


def load_heads(path: str | Path) -> dict[str, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"Heads file '{path}' does not exist.")
    with path.open("rb") as handle:
        data = pickle.load(handle)
    if not isinstance(data, dict):
        raise DatasetError(f"'{path}' does not hold scikit-learn heads.")
    return data


def _pip_requirements() -> list[str]:
    return [f"{name}=={package_version(name)}" for name in ("scikit-learn", "skops")]


def log_heads_to_mlflow(bundles: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Logs each head as a child run of the active run; returns ``{name: model URI}``."""
    # Lazy: MLflow is slow to import and only needed when a run logs heads.
    import mlflow  # noqa: PLC0415
    import mlflow.sklearn  # noqa: PLC0415
    import skops.io  # noqa: PLC0415
    from mlflow.models import infer_signature  # noqa: PLC0415

    parent = mlflow.active_run()
    if parent is None:
        logger.info("No active MLflow run: heads not logged to MLflow.")
        return {}
    parent_tags = mlflow.get_run(parent.info.run_id).data.tags
    uris = {}
    for name, bundle in bundles.items():
        identity = dict(bundle.get("extractor") or {})
        arch = str(identity.get("architecture", "model"))
        # A model trained in this same run was logged here: it is the extractor the features
        # came from (the features pipeline reads that run's model). Otherwise its file.
        extractor = parent_tags.get(f"{arch}.model_uri") or str(identity.get("source", ""))
        example = np.zeros((1, int(bundle["feature_dim"])), dtype=np.float32)
        signature = infer_signature(example, bundle["model"].predict_proba(example))
        with mlflow.start_run(run_name=f"{arch}.{name}", nested=True):
            mlflow.log_params({"head": name, "estimator": bundle.get("estimator"),
                               "calibration": bundle.get("calibration"),
                               "feature_dim": bundle["feature_dim"],
                               "n_fit_tiles": bundle.get("n_fit_tiles"),
                               "fit_splits": ",".join(bundle.get("fit_splits", [])),
                               **{f"best.{k}": v for k, v in bundle["best_params"].items()}})
            cv = bundle.get("cv") or {}
            mlflow.log_metrics({"cv_score_mean": float(cv.get("mean", np.nan)),
                                "cv_score_std": float(cv.get("std", np.nan)),
                                "fit_seconds": float(bundle.get("fit_seconds", np.nan))})
            mlflow.set_tags({"head": name, "cv_scoring": str(cv.get("scoring")),
                             "extractor_model": extractor,
                             "extractor_architecture": arch,
                             "extractor_weights_sha256": str(identity.get("weights_sha256")),
                             "extractor_record_sha256": str(identity.get("record_sha256"))})
            info = mlflow.sklearn.log_model(
                bundle["model"], name=MLFLOW_ARTIFACT_PATH, signature=signature,
                input_example=example, pip_requirements=_pip_requirements(),
                pyfunc_predict_fn="predict_proba",
                # skops (no pickle) trusts only the types named: those of our own head.
                skops_trusted_types=skops.io.get_untrusted_types(
                    data=skops.io.dumps(bundle["model"])),
                metadata={"classes": list(bundle["classes"]), "extractor": identity},
            )
        uris[name] = info.model_uri
        logger.info("Logged head %s to MLflow: %s (extractor %s)", name, info.model_uri, extractor)
    return uris


# --------------------------------------------------------------------------- finding a head


def find_head(models_dir: str | Path, model: Any, head: str) -> tuple[dict[str, Any], Path]:
    """The newest saved head ``head`` fitted on ``model``'s own features, and its file.

    Heads live in ``<models_dir>/<architecture>/heads.pkl/<version>/heads.pkl`` (the features
    pipelines' catalog entry). Versions are searched newest first and the first whose extractor
    identity matches the model wins, so predicting with an older model version finds the heads
    fitted on it. Errors say what exists and what to run.
    """
    backbone, _ = families.features_and_head(model)
    identity = extractor_identity(model, int(backbone.output_shape[-1]))
    arch = identity["architecture"]
    folder = Path(models_dir) / str(arch) / HEADS_FILE
    versions = sorted(p for p in folder.iterdir() if (p / HEADS_FILE).is_file()) if (
        folder.is_dir()) else []
    if not versions:
        raise ModelError(f"No scikit-learn heads fitted on {arch} features in '{folder}'.",
                         hint=f"fit them with `kedro run --pipeline={arch}_features`")
    names: set[str] = set()
    refused: list[str] = []
    for version in reversed(versions):
        path = version / HEADS_FILE
        bundles = load_heads(path)
        names |= set(bundles)
        if head not in bundles:
            continue
        try:
            check_head_extractor(bundles[head], identity)
        except ModelError as exc:
            refused.append(f"{version.name}: {exc}")
            continue
        logger.info("Head %s from %s (fitted on %s)", head, path,
                    bundles[head]["extractor"].get("source"))
        return bundles[head], path
    if not refused:
        raise ModelError(f"No head '{head}' in '{folder}'; saved heads: "
                         f"{', '.join(sorted(names))}.",
                         hint="name one of them (predict.head / --head)")
    raise ModelError(
        f"Head '{head}' exists in {len(refused)} version(s) of '{folder}' but none was fitted on "
        f"the features of model '{identity['source']}'. Newest: {refused[0]}",
        hint=f"fit heads on this model with `kedro run --pipeline={arch}_features`")


def head_classifier(models_dir: str | Path, model: Any, head: str) -> HeadClassifier:
    """Extractor ``model`` + its head ``head``, ready for prediction (see :func:`find_head`)."""
    bundle, path = find_head(models_dir, model, head)
    return HeadClassifier(model, bundle, heads_source=str(path))
