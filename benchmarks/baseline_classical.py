"""The honest floor: colour histograms + texture statistics per image, an RBF SVM, same split.

A CNN trained from scratch on a few hundred images has to beat this to be worth its hours.
Each image is decoded, downscaled (``--downscale``), and described by ~100 numbers: HSV and
haematoxylin/eosin histograms and statistics (colour deconvolution with the fixed Ruifrok
matrix), grey-level co-occurrence statistics, a rotation-invariant local-binary-pattern
histogram and gradient-magnitude statistics at two scales. A ``StandardScaler + SVC(rbf)``
pipeline gets ``C`` and ``gamma`` from grouped cross-validation over the split's own folds
(patients never straddle folds), is refitted on train + validation, and is scored once on the
test images: image-level macro-F1 with the project's patient-bootstrap 95% interval.

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
from PIL import Image
from scipy import ndimage
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import GridSearchCV, GroupKFold, PredefinedSplit
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from neuroblastoma_cnn.imaging import to_rgb8
from neuroblastoma_cnn.metrics import bootstrap_macro_f1
from neuroblastoma_cnn.params import base_parameters
from neuroblastoma_cnn.pipelines.ingestion.nodes import build_image_manifest
from neuroblastoma_cnn.pipelines.splitting.nodes import check_no_leakage, split_tiles
from neuroblastoma_cnn.stain import HED_FROM_RGB, optical_density, tissue_od_mask

logger = logging.getLogger("baseline_classical")
ROOT = Path(__file__).resolve().parents[1]

C_GRID = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
GAMMA_FACTORS = (0.03, 0.1, 0.3, 1.0, 3.0)  # times 1 / n_features ("scale" after scaling)


# ------------------------------------------------------------------------------ features


def load_downscaled(path: Path, downscale: int) -> np.ndarray:
    """RGB uint8 at 1/``downscale`` of native size (JPEGs decode straight at reduced scale)."""
    with Image.open(path) as image:
        size = (max(1, image.width // downscale), max(1, image.height // downscale))
        image.draft("RGB", size)
        rgb = to_rgb8(image, str(path))
    if rgb.shape[1] != size[0] or rgb.shape[0] != size[1]:
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))
    return rgb


def _histogram(values: np.ndarray, bins: int, low: float, high: float) -> np.ndarray:
    counts, _ = np.histogram(values, bins=bins, range=(low, high))
    return counts / max(1, values.size)


def _hsv(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("HSV"), dtype=np.float64) / 255.0


def glcm_features(grey: np.ndarray, levels: int = 16, distances: tuple[int, ...] = (1, 2, 4)
                  ) -> list[float]:
    """Contrast, homogeneity, energy and correlation of the grey-level co-occurrence matrix,
    averaged over four directions, per distance (Haralick's classic texture statistics)."""
    q = np.minimum((grey * levels).astype(np.int64), levels - 1)
    i_idx, j_idx = np.indices((levels, levels))
    out: list[float] = []
    for d in distances:
        stats = []
        for dy, dx in ((0, d), (d, 0), (d, d), (d, -d)):  # dy >= 0: pairs (y, x), (y+dy, x+dx)
            height, width = q.shape
            a = q[: height - dy, max(0, -dx): width - max(0, dx)]
            b = q[dy:, max(0, dx): width - max(0, -dx)]
            glcm = np.bincount((a * levels + b).ravel(), minlength=levels**2).astype(float)
            glcm = glcm.reshape(levels, levels)
            glcm = glcm + glcm.T
            p = glcm / max(glcm.sum(), 1.0)
            mu = (i_idx * p).sum()
            var = ((i_idx - mu) ** 2 * p).sum()
            stats.append([
                ((i_idx - j_idx) ** 2 * p).sum(),
                (p / (1.0 + np.abs(i_idx - j_idx))).sum(),
                (p**2).sum(),
                ((i_idx - mu) * (j_idx - mu) * p).sum() / var if var > 1e-12 else 1.0,
            ])
        out.extend(np.mean(stats, axis=0).tolist())
    return out


def lbp_histogram(grey: np.ndarray, radius: int = 1) -> list[float]:
    """Rotation-invariant uniform LBP (8 neighbours at ``radius`` pixels): 10-bin histogram."""
    h, w = grey.shape
    r = radius
    centre = grey[r: h - r, r: w - r]
    offsets = ((-r, -r), (-r, 0), (-r, r), (0, r), (r, r), (r, 0), (r, -r), (0, -r))
    bits = np.stack([grey[r + dy: h - r + dy, r + dx: w - r + dx] >= centre
                     for dy, dx in offsets]).astype(np.int64)
    ones = bits.sum(axis=0)
    transitions = np.abs(np.diff(np.concatenate([bits, bits[:1]]), axis=0)).sum(axis=0)
    codes = np.where(transitions <= 2, ones, 9)
    return (np.bincount(codes.ravel(), minlength=10) / codes.size).tolist()


def gradient_features(grey: np.ndarray) -> list[float]:
    magnitude = np.hypot(ndimage.sobel(grey, axis=0), ndimage.sobel(grey, axis=1))
    return [magnitude.mean(), magnitude.std(), *np.percentile(magnitude, [50, 90])]


def image_features(rgb: np.ndarray) -> np.ndarray:
    """About 100 colour and texture numbers describing one (downscaled) image."""
    flat = rgb.reshape(-1, 3)
    od = optical_density(flat)
    tissue = tissue_od_mask(od)
    stains = od @ HED_FROM_RGB  # haematoxylin, eosin, (DAB) concentrations
    tissue_stains = stains[tissue] if tissue.sum() >= 10 else stains
    hsv = _hsv(rgb).reshape(-1, 3)
    grey = flat.astype(np.float64).mean(axis=1).reshape(rgb.shape[:2]) / 255.0
    haema = stains[:, 0].reshape(rgb.shape[:2])
    haema = np.clip(haema / max(np.percentile(haema, 99.5), 1e-6), 0.0, 1.0)
    half = grey[: grey.shape[0] // 2 * 2, : grey.shape[1] // 2 * 2]
    half = half.reshape(half.shape[0] // 2, 2, half.shape[1] // 2, 2).mean(axis=(1, 3))
    parts = [
        [tissue.mean()],
        _histogram(hsv[:, 0], 18, 0, 1), _histogram(hsv[:, 1], 8, 0, 1),
        _histogram(hsv[:, 2], 8, 0, 1),
        *[[s.mean(), s.std(), *np.percentile(s, [10, 50, 90])] for s in tissue_stains[:, :2].T],
        _histogram(tissue_stains[:, 0], 8, -0.2, 1.8),
        glcm_features(grey), glcm_features(haema, distances=(1, 4)),
        lbp_histogram(grey, 1), lbp_histogram(grey, 2),
        gradient_features(grey), gradient_features(half),
    ]
    return np.concatenate([np.asarray(p, dtype=np.float64).ravel() for p in parts])


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


def fit_and_test(features: np.ndarray, table: pd.DataFrame, n_boot: int, seed: int = 0
                 ) -> dict[str, Any]:
    """Grid search on train + validation with grouped folds, one score on test."""
    labels = sorted(table["label"].unique())
    y = table["label"].map({c: i for i, c in enumerate(labels)}).to_numpy()
    fit_rows = (table["split"] != "test").to_numpy()
    test_rows = ~fit_rows
    folds = table.loc[fit_rows, "fold"].to_numpy()
    if len(np.unique(folds)) >= 2 and folds.min() >= 0:
        cv: Any = PredefinedSplit(folds)
        cv_groups = None
    else:
        cv = GroupKFold(n_splits=min(5, table.loc[fit_rows, "group"].nunique()))
        cv_groups = table.loc[fit_rows, "group"].to_numpy()
    d = features.shape[1]
    search = GridSearchCV(
        make_pipeline(StandardScaler(), SVC(kernel="rbf", class_weight="balanced")),
        {"svc__C": list(C_GRID), "svc__gamma": [g / d for g in GAMMA_FACTORS]},
        scoring="f1_macro", cv=cv, n_jobs=1, refit=True,
    )
    search.fit(features[fit_rows], y[fit_rows], groups=cv_groups)
    pred = search.predict(features[test_rows])
    truth = y[test_rows]
    interval = bootstrap_macro_f1(truth, pred, table.loc[test_rows, "group"].to_numpy(),
                                  n_boot=n_boot, seed=seed)
    return {
        "classes": labels,
        "f1_macro": float(f1_score(truth, pred, average="macro")),
        "f1_macro_ci95": [interval["low"], interval["high"]],
        "accuracy": float(accuracy_score(truth, pred)),
        "cv_f1_macro": float(search.best_score_),
        "C": search.best_params_["svc__C"],
        "gamma_times_n_features": search.best_params_["svc__gamma"] * d,
        "n_features": d,
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
    features = np.stack([image_features(load_downscaled(images / p, downscale))
                         for p in table["image_path"]])
    features_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = fit_and_test(features, table, n_boot)
    fit_s = time.perf_counter() - t0
    test = table[table["split"] == "test"].copy()
    test["predicted"] = [result["classes"][i] for i in result.pop("predictions")]
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
