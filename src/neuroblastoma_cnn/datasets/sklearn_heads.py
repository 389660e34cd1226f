"""Versioned scikit-learn heads (classifiers on CNN features), each also an MLflow child run.

A save writes one pickle holding ``{name: head bundle}`` (the fitted estimator plus the identity
of the feature extractor it was fitted on, see ``pipelines/features``) into a new version
folder, so a rerun never replaces heads that predictions may have been made with. With
``log_to_mlflow`` every head also becomes a child run of the active run: the scikit-learn
flavor with a signature, its chosen hyperparameters, its grouped-CV scores, and tags pointing
to the extractor model.

Pickles run code when loaded: load only heads this project wrote.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from collections.abc import Mapping, Sequence
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import numpy as np
from kedro.io.core import DatasetError, Version

from neuroblastoma_cnn.core.errors import ModelError

from .local_versioned import LocalVersionedDataset

logger = logging.getLogger(__name__)

MLFLOW_ARTIFACT_PATH = "model"
HEADS_FILE = "heads.pkl"


# ------------------------------------------------------------------------ extractor identity


def sha256_json(value: Any) -> str:
    """Hash of a JSON-able value, independent of key order."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def weights_sha256(weights: Sequence[np.ndarray]) -> str:
    """Hash of a network's weights (dtype, shape and bytes of each array, in order): the same
    file loaded twice gives the same hash, a retrained model another, whatever its path."""
    digest = hashlib.sha256()
    for weight in weights:
        array = np.ascontiguousarray(weight)
        digest.update(str((array.dtype.str, array.shape)).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


#: Identity keys a head and its extractor must agree on, with how an error names them.
MATCHED_KEYS = (("weights_sha256", "weights"), ("record_sha256", "preprocessing record"),
                ("classes", "classes"), ("feature_dim", "feature dimension"),
                ("architecture", "architecture"))


def _short(value: Any) -> Any:
    return value[:12] if isinstance(value, str) and len(value) == 64 else value


def check_head_extractor(bundle: Mapping[str, Any], extractor: Mapping[str, Any]) -> None:
    """Refuses a head fitted on another extractor's features, naming what differs."""
    fitted = dict(bundle.get("extractor") or {})
    problems = [f"{what} {_short(fitted.get(key))!r} vs {_short(extractor.get(key))!r}"
                for key, what in MATCHED_KEYS if fitted.get(key) != extractor.get(key)]
    if problems:
        arch = extractor.get("architecture") or fitted.get("architecture") or "<model>"
        raise ModelError(
            f"Head '{bundle.get('name', '?')}' was fitted on features of "
            f"{fitted.get('architecture')} model '{fitted.get('source')}', not of "
            f"'{extractor.get('source')}': "
            + "; ".join(problems) + ".",
            hint=f"fit heads on this model with `kedro run --pipeline={arch}_features`, or "
                 "predict with the model version the head was fitted on")


def head_probabilities(estimator: Any, features: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities with one column per class index 0..k-1 (a class the head never saw: 0)."""
    prob = np.asarray(estimator.predict_proba(features), dtype=np.float64)
    seen = np.asarray(estimator.classes_, dtype=int)
    if len(seen) == n_classes and (seen == np.arange(n_classes)).all():
        return prob
    out = np.zeros((len(features), n_classes))
    out[:, seen] = prob
    return out


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
