"""A real run on the BACH images: raw tissue to evaluated models, through `kedro run`.

Builds a throw-away project folder (pyproject + conf, raw images linked read-only from BACH),
runs the full `train_<model>` pipeline for the first model, then the model half of the others
on the same data artifacts, and prints one JSON line per run: wall time, training time, peak
memory of the kedro process, the kept epoch with its train / validation accuracy and their gap,
and the test metrics (image-level macro-F1 with its patient-resampled 95% interval, and the
same with test-time augmentation when evaluation.tta is on).

Parameters go into the project's ``conf/local/parameters_bench.yml`` (merged key by key over
conf/base, or over ``--env``'s folder), so nested keys and regular expressions need no quoting:
``--group-pattern`` for BACH's blocks of ten images, ``--config FILE.yml`` for a recipe, ``--set
key.path=value`` (YAML value) for single keys. ``--reuse`` runs the model half again in an
existing ``--workdir`` (same tiles, same split: ablations). Nothing is written into the repo.

    python benchmarks/bach_end_to_end.py --epochs 10 --fine-tune-epochs 2
    python benchmarks/bach_end_to_end.py --models resnet34 --workdir /tmp/bach \\
        --group-pattern '^(?P<group>[a-z]+\\d\\d)\\d' --env study_preset --label study
    python benchmarks/bach_end_to_end.py --models resnet34 --workdir /tmp/bach --reuse \\
        --set resnet34.training.stain_normalisation=macenko --label stain
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]


def make_project(workdir: Path, images: Path) -> Path:
    project = workdir / "project"
    project.mkdir(parents=True)
    (project / "src").mkdir()
    shutil.copy(ROOT / "pyproject.toml", project)
    shutil.copytree(ROOT / "conf", project / "conf",
                    ignore=lambda folder, names: names if Path(folder).name == "local" else [])
    (project / "conf" / "local").mkdir(exist_ok=True)
    (project / "data" / "01_raw").mkdir(parents=True)
    (project / "data" / "01_raw" / "images").symlink_to(images.resolve())
    return project


def latest(path: Path) -> Path:
    return sorted(p for p in path.iterdir() if p.is_dir())[-1] / path.name


def nested_set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    for part in path:
        tree = tree.setdefault(part, {})
    tree[last] = value


def write_parameters(project: Path, env: str | None, local: dict[str, Any],
                     assignments: list[str]) -> None:
    """``local`` with each ``key.path=value`` (YAML value) applied, written to the project's
    ``conf/<env or local>/parameters_bench.yml`` (merged key by key over the defaults)."""
    for assignment in assignments:
        key, _, value = assignment.partition("=")
        nested_set(local, key.strip(), yaml.safe_load(value))
    folder = project / "conf" / (env or "local")
    folder.mkdir(exist_ok=True)
    (folder / "parameters_bench.yml").write_text(yaml.safe_dump(local, sort_keys=False))


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (merge(out[key], value) if isinstance(value, dict)
                    and isinstance(out.get(key), dict) else value)
    return out


def run(project: Path, pipeline: str, env: str | None, label: str) -> dict:
    kedro = Path(sys.executable).with_name("kedro")
    command = [str(kedro), "run", f"--pipeline={pipeline}"]
    if env:
        command.append(f"--env={env}")
    environ = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    log = project / f"{label or pipeline}.log"
    with log.open("w") as out:
        code = subprocess.call(command, cwd=project, env=environ, stdout=out,
                               stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    peak_mb = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    if code != 0:
        raise SystemExit(f"{pipeline} failed with exit code {code}; see {log}")
    return {"pipeline": pipeline, "wall_s": round(wall, 1), "peak_rss_mb": round(peak_mb),
            "log": str(log)}


def kept_epoch(log: Path, history: pd.DataFrame) -> dict[str, Any]:
    """The epoch training kept (from its log line) with its train and validation accuracy."""
    found = re.findall(r"(?:train|fine_tune): kept epoch (\d+)", log.read_text())
    epoch = int(found[-1]) if found else int(history["epoch"].iloc[-1])
    row = history[history["epoch"] == epoch].iloc[-1]
    out = {"epochs_run": len(history), "kept_epoch": epoch,
           "train_s": round(float(history["seconds"].sum()), 1),
           "train_accuracy": round(float(row["accuracy"]), 3),
           "val_accuracy": round(float(row["val_accuracy"]), 3),
           "gap": round(float(row["accuracy"] - row["val_accuracy"]), 3),
           "val_macro_f1": round(float(row["val_macro_f1"]), 3)}
    if "val_image_macro_f1" in row and pd.notna(row["val_image_macro_f1"]):
        out["val_image_macro_f1"] = round(float(row["val_image_macro_f1"]), 3)
    return out


def test_figures(metrics: dict[str, Any]) -> dict[str, Any]:
    def interval(ci: dict[str, float]) -> list[float]:
        return [round(ci["low"], 3), round(ci["high"], 3)]

    out = {"test_images": metrics["n_test_images"], "test_tiles": metrics["n_test_tiles"],
           "test_groups": metrics.get("n_test_groups"),
           "f1_macro": round(metrics["f1_macro"], 3),
           "f1_macro_ci95": interval(metrics["macro_f1_ci"]),
           "accuracy": round(metrics["accuracy"], 3),
           "tile_f1_macro": round(metrics["tile"]["f1_macro"], 3)}
    if "tta" in metrics:
        out.update({"tta_f1_macro": round(metrics["tta"]["f1_macro"], 3),
                    "tta_f1_macro_ci95": interval(metrics["tta"]["macro_f1_ci"]),
                    "tta_accuracy": round(metrics["tta"]["accuracy"], 3)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared/data/bach/images")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--reuse", action="store_true",
                        help="run only the model half in the existing --workdir project")
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--stride", type=int, default=None, help="default: = tile size")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--group-pattern", default=None,
                        help=r"e.g. '^(?P<group>[a-z]+\d\d)\d' (BACH's blocks of ten)")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--fine-tune-epochs", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=["resnet34", "resnet50"])
    parser.add_argument("--env", default=None,
                        help="Kedro environment, e.g. study_preset (the study's settings)")
    parser.add_argument("--config", type=Path, action="append", default=[],
                        help="YAML parameters merged over the defaults (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="one parameter, YAML value (repeatable; after --config)")
    parser.add_argument("--augment", action="store_true",
                        help="with --reuse: run the augmentation pipeline again first (its "
                        "parameters changed, e.g. the study's target_per_class)")
    parser.add_argument("--label", default="", help="a name for this run in the output")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bach-e2e-"))
    if args.reuse:
        project = workdir / "project"
        if not (project / "data" / "03_primary").is_dir():
            raise SystemExit(f"--reuse: no earlier run's data in '{project}'")
    else:
        project = make_project(workdir, args.images)
    local: dict[str, Any] = {"ingestion": {
        "tile_size": args.tile_size, "stride": args.stride or args.tile_size,
        "input_size": args.input_size, "group_pattern": args.group_pattern}}
    for model in args.models:
        nested_set(local, f"{model}.training.epochs", args.epochs)
    if "resnet50" in args.models:
        nested_set(local, "resnet50.model.weights", None)
        nested_set(local, "resnet50.training.fine_tune_epochs", args.fine_tune_epochs)
    for path in args.config:
        local = merge(local, yaml.safe_load(path.read_text()) or {})
    write_parameters(project, args.env, local, args.set)

    if args.reuse and args.augment:
        run(project, "augmentation", args.env, f"{args.label}-augmentation")
    for i, model in enumerate(args.models):
        first = i == 0 and not args.reuse
        label = f"{args.label}-{model}" if args.label else ""
        result = run(project, f"train_{model}" if first else model, args.env, label)
        metrics = json.loads(latest(project / f"data/08_reporting/{model}/test_metrics.json")
                             .read_text())
        history = pd.read_csv(latest(project / f"data/06_models/{model}/training_history.csv"))
        tiles = json.loads((latest(project / "data/03_primary/tiles") / "store.json").read_text())
        result.update({"label": args.label, "model": model, "env": args.env,
                       "tiles": tiles["count"], **kept_epoch(Path(result["log"]), history),
                       **test_figures(metrics)})
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
