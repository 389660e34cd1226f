"""A real run on the BACH images: raw tissue to evaluated models, through `kedro run`.

Builds a throw-away project folder (pyproject + conf, raw images linked read-only from BACH),
runs the full `train_resnet34` pipeline, then the `resnet50` model half on the same data
artifacts, and prints one JSON line per run: wall time, peak memory of the kedro process and
the test metrics (image-level macro-F1 with its patient-resampled 95% interval).

BACH has no patient ids, so every image is its own group (the default without a patient
folder); tiles of one image therefore never straddle splits. Nothing is written into the repo.

    python benchmarks/bach_end_to_end.py --epochs 10 --fine-tune-epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def run(project: Path, pipeline: str, params: list[str]) -> dict:
    kedro = Path(sys.executable).with_name("kedro")
    command = [str(kedro), "run", f"--pipeline={pipeline}", "--params", ",".join(params)]
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    log = project / f"{pipeline}.log"
    with log.open("w") as out:
        code = subprocess.call(command, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    peak_mb = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    if code != 0:
        raise SystemExit(f"{pipeline} failed with exit code {code}; see {log}")
    return {"pipeline": pipeline, "wall_s": round(wall, 1), "peak_rss_mb": round(peak_mb),
            "log": str(log)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared/data/bach/images")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--fine-tune-epochs", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=["resnet34", "resnet50"])
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bach-e2e-"))
    project = make_project(workdir, args.images)
    data = [f"ingestion.tile_size={args.tile_size}", f"ingestion.stride={args.tile_size}",
            f"ingestion.input_size={args.input_size}"]
    for i, model in enumerate(args.models):
        params = [*data, f"{model}.training.epochs={args.epochs}"]
        if model == "resnet50":
            params += ["resnet50.model.weights=null",
                       f"resnet50.training.fine_tune_epochs={args.fine_tune_epochs}"]
        result = run(project, f"train_{model}" if i == 0 else model, params)
        metrics = json.loads(latest(project / f"data/08_reporting/{model}/test_metrics.json")
                             .read_text())
        tiles = json.loads((latest(project / "data/03_primary/tiles") / "store.json").read_text())
        result.update({
            "model": model, "epochs": args.epochs, "tiles": tiles["count"],
            "test_images": metrics["n_test_images"], "test_tiles": metrics["n_test_tiles"],
            "f1_macro": round(metrics["f1_macro"], 3),
            "f1_macro_ci95": [round(metrics["macro_f1_ci"]["low"], 3),
                              round(metrics["macro_f1_ci"]["high"], 3)],
            "accuracy": round(metrics["accuracy"], 3),
            "tile_f1_macro": round(metrics["tile"]["f1_macro"], 3),
        })
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
