"""Times the demo run (`kedro run --env=demo --pipeline=train_resnet34`) on a Kather-shaped set.

The real demo archive (Kather 2016, Zenodo) cannot be downloaded on this machine, so this builds
an archive with its layout from BACH tissue: 150x150 px TIFF tiles named
`<id>_CRC-Prim-HE-<NN>_<n>.tif_Row_<r>_Col_<c>.tif` in `<NN_CLASS>/` folders, every slide holding
tiles of every class. BACH has 4 classes, not Kather's 8; use --tiles-per-class to give the
run as many images as the demo's subset of 8 classes (e.g. 8 x 100 = 4 x 200). The zip is placed
where the demo looks for it, so the run unpacks it but downloads nothing (download excluded).
Prints wall and CPU time (other jobs on the machine inflate the wall time, not the CPU time).
Everything derived from BACH goes to a temporary folder (licence). Prints one JSON line.

    python benchmarks/demo_kather_like.py --tiles-per-class 200
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

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from _kather_like import ARCHIVE_NAME, make_kather_like, zip_folder  # noqa: E402


def make_project(workdir: Path) -> Path:
    project = workdir / "project"
    project.mkdir(parents=True)
    (project / "src").mkdir()
    shutil.copy(ROOT / "pyproject.toml", project)
    shutil.copytree(ROOT / "conf", project / "conf",
                    ignore=lambda folder, names: names if Path(folder).name == "local" else [])
    (project / "conf" / "local").mkdir(exist_ok=True)
    (project / "data" / "01_raw").mkdir(parents=True)
    return project


def run(command: list[str], project: Path, env: dict[str, str], log: Path) -> tuple[float, float]:
    """Wall time and CPU time (user + system, all threads) of one `kedro run`: the CPU time
    says what the run costs when other jobs share the cores."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.call(command, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        raise SystemExit(f"{' '.join(command[1:4])} failed with exit code {code}; see {log}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def latest(path: Path) -> Path:
    return sorted(p for p in path.iterdir() if p.is_dir())[-1] / path.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bach", type=Path, default=ROOT.parent / "shared/data/bach")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--tiles-per-class", type=int, default=200)
    parser.add_argument("--tiles-per-image", type=int, default=4)
    parser.add_argument("--slides", type=int, default=10)
    parser.add_argument("--downscale", type=int, default=2)
    parser.add_argument("--params", default="", help="extra --params for the run")
    parser.add_argument("--predict", action="store_true",
                        help="then time `kedro run --env=demo --pipeline=predict` too")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="demo-kather-like-"))
    images = -(-args.tiles_per_class // args.tiles_per_image)
    # Folders named like Kather's first four (Benign -> 01_TUMOR, ...): the demo's predict
    # entry reads 01_TUMOR. The tissue is BACH's whatever the name says.
    tree = make_kather_like(workdir / "tree", args.bach, images_per_class=images,
                            n_slides=args.slides, tiles_per_image=args.tiles_per_image,
                            downscale=args.downscale,
                            folder_names=("01_TUMOR", "02_STROMA", "03_COMPLEX", "04_LYMPHO"))
    project = make_project(workdir)
    md5 = zip_folder(tree, project / "data" / "01_raw" / ARCHIVE_NAME)
    shutil.rmtree(tree)

    params = ",".join(p for p in (f"demo.md5=md5:{md5}", args.params) if p)
    command = [str(Path(sys.executable).with_name("kedro")), "run", "--env=demo",
               "--pipeline=train_resnet34", "--params", params]
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "COLUMNS": "200"}
    load_before = os.getloadavg()
    wall, cpu = run(command, project, env, workdir / "run.log")
    predict_wall = predict_cpu = None
    if args.predict:
        predict_wall, predict_cpu = run([*command[:3], "--pipeline=predict", *command[4:]],
                                        project, env, workdir / "predict.log")
    metrics = json.loads(latest(project / "data/08_reporting/resnet34/test_metrics.json")
                         .read_text())
    store = json.loads((latest(project / "data/03_primary/tiles") / "store.json").read_text())
    split = (latest(project / "data/05_model_input/split_table.csv"))
    table = pd.read_csv(split, dtype={"group": str})
    print(json.dumps({
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "predict_wall_s": predict_wall and round(predict_wall, 1),
        "predict_cpu_s": predict_cpu and round(predict_cpu, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "tiles": store["count"],
        "tiles_per_split": table["split"].value_counts().to_dict(),
        "slides_per_split": table.groupby("split")["group"].nunique().to_dict(),
        "test_images": metrics["n_test_images"],
        "f1_macro": round(metrics["f1_macro"], 3),
        "f1_macro_ci95": [round(metrics["macro_f1_ci"]["low"], 3),
                          round(metrics["macro_f1_ci"]["high"], 3)],
        "accuracy": round(metrics["accuracy"], 3),
        "params": params,
        "log": str(workdir / "run.log"),
    }), flush=True)


if __name__ == "__main__":
    main()
