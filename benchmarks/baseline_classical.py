"""The honest floor: colour histograms + texture statistics per image, an RBF SVM, same split.

A CNN trained from scratch on a few hundred images has to beat this to be worth its hours.
The features and the model are the package's (``neuroblastoma_cnn.models.classical``, which the
cross-validation study also trains): each image is decoded at 1/``--downscale`` and described by
101 colour and texture numbers, and ``ColourTextureSVM`` (``StandardScaler + SVC(rbf)``) gets
``C`` and ``gamma`` from ``splitting.n_folds`` grouped inner folds over train + validation
(patients never straddle folds), sigmoid probabilities calibrated on the same folds, and is
scored once on the test images: image-level macro-F1 of the most probable class, with the
project's patient-bootstrap 95% interval.

The split is the project's: the manifest comes from the ingestion node and the split table from
the splitting nodes, with the parameters of ``conf/base`` (plus ``--set`` overrides), so the test
images are the ones a CNN run with the same parameters is tested on. Every image counts once,
whatever its number of tiles (its tile count only decides its class if a patient mixes classes,
exactly as in the tile split).

    python benchmarks/baseline_classical.py --images data/01_raw/images
    python benchmarks/baseline_classical.py --images ../shared/data/bach/images \
        --set "ingestion.group_pattern=^(?P<group>[a-z]+\\d\\d)\\d" \
        --set ingestion.tile_size=512 --set ingestion.stride=512 --set ingestion.input_size=128

Prints one JSON line; ``--out DIR`` also writes the per-image test predictions and features.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, get_type_hints

import numpy as np
import pandas as pd
import yaml
from sklearn.metrics import accuracy_score, f1_score

from neuroblastoma_cnn.analysis.metrics import bootstrap_macro_f1
from neuroblastoma_cnn.models.classical import (
    C_GRID,
    GAMMA_FACTORS,
    ColourTextureSVM,
    describe_images,
)
from neuroblastoma_cnn.params import base_parameters
from neuroblastoma_cnn.pipelines.ingestion.nodes import build_image_manifest
from neuroblastoma_cnn.pipelines.splitting.nodes import check_no_leakage, split_tiles

logger = logging.getLogger("baseline_classical")
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- the split


def _typed(func: Any, raw: dict[str, Any], key: str) -> Any:
    """The node's parameters as it declares them: a typed model, or the plain mapping."""
    hint = get_type_hints(func).get("params")
    return hint.parse(raw, key) if hasattr(hint, "parse") else raw


def image_split(images: Path, parameters: dict[str, Any]) -> pd.DataFrame:
    """One row per image that yields training tiles: image_path, label, group, split, fold."""
    manifest, rejected = build_image_manifest(
        images, _typed(build_image_manifest, parameters["ingestion"], "ingestion"))
    if len(rejected):
        logger.info("%d file(s) not used (see the ingestion log)", len(rejected))
    manifest = manifest[manifest["n_tiles"] > 0].reset_index(drop=True)
    # One row per tile an image would give, so a mixed-class patient is stratified by the
    # class of most of its tiles, as the tile split does; then back to one row per image.
    rows = manifest.loc[manifest.index.repeat(manifest["n_tiles"].astype(int)),
                        ["image_path", "label", "group"]].reset_index(drop=True)
    rows.insert(0, "tile_id", np.arange(len(rows)))
    split_params = parameters["splitting"]
    table = split_tiles(rows, _typed(split_tiles, split_params, "splitting"))
    table = check_no_leakage(table, _typed(check_no_leakage, split_params, "splitting"))
    return table.drop_duplicates("image_path").drop(columns="tile_id").reset_index(drop=True)


# ------------------------------------------------------------------------------ the model


def fit_and_test(features: np.ndarray, table: pd.DataFrame, n_boot: int, inner_folds: int,
                 seed: int = 0) -> dict[str, Any]:
    """The package's ColourTextureSVM fitted on train + validation, scored once on test."""
    fit_rows = (table["split"] != "test").to_numpy()
    test_rows = ~fit_rows
    fit = table[fit_rows]
    model = ColourTextureSVM(C_GRID, GAMMA_FACTORS, inner_folds=inner_folds, seed=seed)
    model.fit(features[fit_rows], fit["label"].astype(str), fit["group"].astype(str))
    pred = model.predict(features[test_rows]).astype(str)
    truth = table.loc[test_rows, "label"].astype(str).to_numpy()
    codes = {c: i for i, c in enumerate(model.classes_)}  # the bootstrap counts class indices
    interval = bootstrap_macro_f1([codes[c] for c in truth], [codes[c] for c in pred],
                                  table.loc[test_rows, "group"].to_numpy(), n_boot=n_boot,
                                  seed=seed)
    return {
        "classes": model.classes_,
        "f1_macro": float(f1_score(truth, pred, average="macro")),
        "f1_macro_ci95": [interval["low"], interval["high"]],
        "accuracy": float(accuracy_score(truth, pred)),
        "cv_f1_macro": model.cv_score_,
        "C": model.best_params_["C"],
        "gamma_times_n_features": model.best_params_["gamma_factor"],
        "n_features": int(features.shape[1]),
        "inner_folds": model.n_inner_folds_,
        "predictions": pred,
    }


def _set(parameters: dict[str, Any], assignment: str) -> None:
    key, _, value = assignment.partition("=")
    *path, last = key.strip().split(".")
    node = parameters
    for part in path:
        node = node[part]
    if last not in node:
        raise SystemExit(f"--set {key}: no such parameter (known: {sorted(node)})")
    node[last] = yaml.safe_load(value) if value.strip() else None


def run(images: Path, parameters: dict[str, Any], downscale: int, n_boot: int,
        out: Path | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    table = image_split(images, parameters)
    split_s = time.perf_counter() - started
    t0 = time.perf_counter()
    features = describe_images([images / p for p in table["image_path"]], downscale,
                               where="baseline_classical")
    features_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    inner_folds = int(parameters["splitting"]["n_folds"])
    result = fit_and_test(features, table, n_boot, inner_folds)
    fit_s = time.perf_counter() - t0
    test = table[table["split"] == "test"].copy()
    test["predicted"] = result.pop("predictions")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        test.to_csv(out / "baseline_test_predictions.csv", index=False)
        pd.DataFrame(features).assign(image_path=table["image_path"]).to_csv(
            out / "baseline_features.csv", index=False)
    counts = table["split"].value_counts()
    return {
        "model": "colour+texture RBF-SVM",
        **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()},
        "f1_macro_ci95": [round(v, 3) for v in result["f1_macro_ci95"]],
        "images": {s: int(counts.get(s, 0)) for s in ("train", "validation", "test")},
        "test_groups": int(test["group"].nunique()),
        "downscale": downscale,
        "split_s": round(split_s, 1), "features_s": round(features_s, 1),
        "fit_s": round(fit_s, 1), "wall_s": round(time.perf_counter() - started, 1),
        "cpus": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=ROOT / "data/01_raw/images",
                        help="raw folder: <class>/<patient>/<file> or <class>/<file>")
    parser.add_argument("--conf", type=Path, default=ROOT / "conf/base",
                        help="folder of parameters*.yml (the project's defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter, e.g. ingestion.group_pattern=... "
                        "(YAML value; repeatable)")
    parser.add_argument("--downscale", type=int, default=8,
                        help="features are computed at 1/N of native size")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    parameters = base_parameters(args.conf)
    for assignment in args.set:
        _set(parameters, assignment)
    n_boot = int(parameters.get("evaluation", {}).get("bootstrap_samples", 1000))
    result = run(args.images, parameters, args.downscale, n_boot, args.out)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
