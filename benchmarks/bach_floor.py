"""The classical floors on the same grouped folds: the benchmark's simple versions against the
selected floor (scale, feature groups and head chosen on grouped inner folds).

Every image of a raw folder (``<class>/<file>``) is grouped by ``--group-pattern`` on its file
name, the groups are dealt into ``--folds`` stratified folds (``core.group_folds``), and each
floor is fitted on K-1 folds and scored on the held-out one. Printed (one JSON line): per floor
the pooled out-of-fold macro-F1 with its 95% interval over groups, the per-fold scores and the
per-fold difference to the selected floor, what the selected floor chose per fold, and times.

    python benchmarks/bach_floor.py --images ../shared/data/bach/images \\
        --group-pattern '^(?P<group>[a-z]+\\d\\d)\\d' --folds 5 --cache /tmp/bach-floor

The floors:
- ``simple_svm``: the original benchmark: the 101 colour + texture numbers at 1/8, an RBF SVM
  whose C and gamma a plain grid search picks on grouped inner folds, predicting with
  ``SVC.predict`` (no calibration);
- ``simple_colour_svm``: colour histograms + gradient statistics at 1/4, the same SVM search;
- ``colour_texture_svm``: the package's ``ColourTextureSVM`` (101 numbers at 1/8, calibrated);
- ``selected``: ``SelectedFloor`` with the search of ``conf/base/parameters_select_model.yml``.

For the floors with probabilities (``colour_texture_svm``, ``selected``) it also reports
class-conditional prediction sets at ``--coverage``: each fold's sets calibrated on the other
folds' out-of-fold probabilities (no patient on both sides), pooled. ``--only`` runs a subset.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import f1_score
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from neuroblastoma_cnn.analysis.conformal import ClassConditionalConformal, set_report
from neuroblastoma_cnn.analysis.metrics import bootstrap_macro_f1
from neuroblastoma_cnn.core.group_folds import stratified_group_folds
from neuroblastoma_cnn.models.classical import (
    C_GRID,
    CORE_GROUPS,
    GAMMA_FACTORS,
    ColourTextureSVM,
    group_columns,
    grouped_folds,
)
from neuroblastoma_cnn.models.selected_floor import SelectedFloor, describe_bank
from neuroblastoma_cnn.params import base_parameters

ROOT = Path(__file__).resolve().parents[1]


def image_table(images: Path, pattern: str | None) -> tuple[list[Path], np.ndarray, np.ndarray]:
    paths = sorted(p for p in images.glob("*/*") if p.is_file())
    labels = np.asarray([p.parent.name for p in paths])
    if pattern:
        groups = np.asarray([re.match(pattern, p.stem).group("group") for p in paths])
    else:
        groups = np.asarray([p.stem for p in paths])
    return paths, labels, groups


def bank_for(paths: list[Path], scales: list[int], cache: Path | None) -> dict[int, np.ndarray]:
    """Features per scale, cached under ``cache`` (derived data: outside the repository)."""
    bank = {}
    for scale in scales:
        file = cache / f"features_1_{scale}.npy" if cache else None
        if file is not None and file.exists():
            bank[scale] = np.load(file)
            continue
        bank.update(describe_bank(paths, [scale]))
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            np.save(file, bank[scale])
    return bank


def simple_svm(x: np.ndarray, y: np.ndarray, g: np.ndarray, inner: int, seed: int) -> Any:
    d = x.shape[1]
    search = GridSearchCV(make_pipeline(StandardScaler(), SVC(kernel="rbf",
                                                              class_weight="balanced")),
                          {"svc__C": list(C_GRID), "svc__gamma": [f / d for f in GAMMA_FACTORS]},
                          scoring="f1_macro", cv=grouped_folds(y, g, inner, seed), n_jobs=1)
    return search.fit(x, y)


def simple_floor(name: str, bank: dict[int, np.ndarray], y: np.ndarray, g: np.ndarray,
                 train: np.ndarray, test: np.ndarray, inner: int, seed: int) -> np.ndarray:
    """One of the simpler floors fitted on ``train``, its predictions for ``test``."""
    if name == "simple_colour_svm":
        columns, scale = group_columns(["rgb", "gradient"]), 4
    else:
        columns, scale = group_columns(CORE_GROUPS), 8
    x = bank[scale][:, columns]
    if name == "colour_texture_svm":
        model: Any = ColourTextureSVM(C_GRID, GAMMA_FACTORS, inner, seed=seed)
        model.fit(x[train], y[train], g[train])
        prob = model.probabilities_over(x[test], sorted(set(y)))
        return np.asarray(sorted(set(y)), dtype=object)[prob.argmax(1)], prob
    model = simple_svm(x[train], y[train], g[train], inner, seed)
    return model.predict(x[test]), None


def conformal_by_fold(prob: np.ndarray, y: np.ndarray, g: np.ndarray, folds: list,
                      classes: list[str], coverage: float) -> dict[str, Any]:
    """Prediction sets for each fold calibrated on the other folds' out-of-fold probabilities
    (patients never on both sides), pooled: coverage overall and per class, set size, share
    referred, accuracy of the accepted images."""
    sets = np.zeros(prob.shape, dtype=bool)
    for _, test in folds:
        calibration = np.setdiff1d(np.arange(len(y)), test)
        conformal = ClassConditionalConformal(coverage).fit(prob[calibration], y[calibration],
                                                            classes, g[calibration])
        sets[test] = conformal.predict_sets(prob[test])
    report = set_report(sets, y, classes, np.asarray(classes)[prob.argmax(1)])
    return {k: (round(v, 3) if isinstance(v, float) else
                {c: round(x, 3) for c, x in v.items()} if isinstance(v, dict) else v)
            for k, v in report.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared/data/bach/images")
    parser.add_argument("--group-pattern", default=r"^(?P<group>[a-z]+\d\d)\d")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--only", default=None, help="comma-separated floors to run")
    parser.add_argument("--coverage", type=float, default=0.9,
                        help="prediction sets of the floors with probabilities")
    args = parser.parse_args()

    space = base_parameters(ROOT / "conf/base")["select_model"]["floor"]
    paths, y, g = image_table(args.images, args.group_pattern)
    t0 = time.perf_counter()
    bank = bank_for(paths, sorted({4, 8, *space["scales"]}), args.cache)
    features_s = time.perf_counter() - t0
    folds = stratified_group_folds(y, g, args.folds, args.seed)
    classes = sorted(set(y))
    names = ["simple_svm", "simple_colour_svm", "colour_texture_svm", "selected"]
    names = [n for n in names if args.only is None or n in args.only.split(",")]
    predicted = {n: np.empty(len(y), dtype=object) for n in names}
    prob = {n: np.zeros((len(y), len(classes))) for n in ("colour_texture_svm", "selected")}
    per_fold: dict[str, list[float]] = {n: [] for n in names}
    seconds = dict.fromkeys(names, 0.0)
    chosen = []
    for k, (train, test) in enumerate(folds):
        inner, seed = int(space["inner_folds"]), args.seed + k
        for name in [n for n in names if n != "selected"]:
            t0 = time.perf_counter()
            predicted[name][test], p = simple_floor(name, bank, y, g, train, test, inner, seed)
            if p is not None:
                prob[name][test] = p
            seconds[name] += time.perf_counter() - t0
        if "selected" in names:
            t0 = time.perf_counter()
            floor = SelectedFloor(space["scales"], space["feature_sets"], space["heads"], inner,
                                  space["calibration"], seed=seed)
            floor.fit({s: bank[s][train] for s in bank}, y[train], g[train])
            prob["selected"][test] = floor.probabilities_over(
                {s: bank[s][test] for s in bank}, classes)
            predicted["selected"][test] = np.asarray(classes)[prob["selected"][test].argmax(1)]
            seconds["selected"] += time.perf_counter() - t0
            chosen.append({"fold": k, "chosen": floor.chosen_.describe(),
                           "inner_f1": round(floor.cv_score_, 3)})
        for name in names:
            per_fold[name].append(float(f1_score(y[test], predicted[name][test],
                                                 average="macro")))
    codes = {c: i for i, c in enumerate(classes)}
    truth = [codes[c] for c in y]
    result: dict[str, Any] = {}
    for name in names:
        pred = [codes[c] for c in predicted[name]]
        interval = bootstrap_macro_f1(truth, pred, g, n_boot=1000, seed=0)
        result[name] = {"pooled_f1": round(float(f1_score(truth, pred, average="macro")), 3),
                        "ci95": [round(interval["low"], 3), round(interval["high"], 3)],
                        "per_fold": [round(v, 3) for v in per_fold[name]],
                        "fit_s": round(seconds[name], 1)}
        if "selected" in names:
            diff = np.asarray(per_fold["selected"]) - np.asarray(per_fold[name])
            result[name]["selected_minus_this_per_fold"] = [round(v, 3) for v in diff]
        if name in prob:
            result[name]["prediction_sets"] = conformal_by_fold(prob[name], y, g, folds,
                                                                classes, args.coverage)
    print(json.dumps({"images": len(y), "groups": len(set(g)), "folds": args.folds,
                      "features_s": round(features_s, 1), "floors": result,
                      "selected_choices": chosen}))


if __name__ == "__main__":
    main()
