"""Cross-validation on the BACH images, through `kedro run --pipeline=cross_validate_<model>`.

Builds a throw-away project (as ``bach_end_to_end.py``: raw images linked read-only, nothing
written into the repo), writes the parameters to ``conf/local/parameters_bench.yml`` and runs
the pipeline; prints one JSON line: wall time, peak memory of the kedro process, per-fold
training time and scores, and the summary rows (the CNN, the floor, their mean: over folds,
pooled out of fold with its interval, paired against the floor, and on the outer patients).

``--kill-after N`` stops the run (SIGKILL) once N folds are complete, then starts the same
command again and reports both runs: the resumed run must train only the missing folds.

    python benchmarks/bach_cross_validate.py --workdir /tmp/bach-cv \\
        --group-pattern '^(?P<group>[a-z]+\\d\\d)\\d' --input-size 64 --epochs 40 \\
        --set resnet34.training.precision=mixed_bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bach_end_to_end import ROOT, latest, make_project, nested_set, write_parameters


def completed_folds(project: Path, model: str) -> int:
    """Folds whose folder is complete (``fold.json`` is written last, then the rename)."""
    root = project / "data" / "06_models" / model / "cross_validation"
    return len(list(root.glob("*/fold_*/fold.json"))) if root.is_dir() else 0


def run(project: Path, pipeline: str, env: str | None, label: str, model: str,
        kill_after: int | None = None) -> dict[str, Any]:
    kedro = Path(sys.executable).with_name("kedro")
    command = [str(kedro), "run", f"--pipeline={pipeline}"] + ([f"--env={env}"] if env else [])
    environ = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}
    log = project / f"{label}.log"
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=project, env=environ, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        killed = False
        while process.poll() is None:
            time.sleep(2)
            if kill_after is not None and completed_folds(project, model) >= kill_after:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                killed = True
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_mb = usage.ru_maxrss / 1024
    if process.returncode != 0 and not killed:
        raise SystemExit(f"{pipeline} failed with exit code {process.returncode}; see {log}")
    return {"label": label, "wall_s": round(wall, 1), "peak_rss_mb": round(peak_mb),
            # CPU seconds of every run so far (the machine may be shared: wall time is not)
            "cpu_s_cumulative": round(usage.ru_utime + usage.ru_stime, 1),
            "killed_after_folds": completed_folds(project, model) if killed else None,
            "log": str(log)}


def results(project: Path, model: str) -> dict[str, Any]:
    data = project / "data"
    summary = pd.read_csv(latest(data / f"08_reporting/{model}/cv_summary.csv"))
    trials = pd.read_csv(latest(data / f"06_models/{model}/cv_trials.csv"))
    folds = pd.read_csv(latest(data / f"08_reporting/{model}/cv_fold_metrics.csv"))
    return {"summary": summary.round(4).to_dict("records"),
            "folds": trials[["fold", "trial", "val_macro_f1", "f1_macro", "seconds"]]
            .round(3).to_dict("records"),
            "per_fold_f1": folds.pivot_table(index="model", columns="fold", values="f1_macro")
            .round(3).to_dict("index"),
            "report": str(latest(data / f"08_reporting/{model}/cv_report.md"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared/data/bach/images")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--model", default="resnet34")
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--group-pattern", default=None)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--env", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--kill-after", type=int, default=None,
                        help="SIGKILL the run once this many folds are complete, then resume")
    parser.add_argument("--label", default="cv")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bach-cv-"))
    project = make_project(workdir, args.images)
    local: dict[str, Any] = {"ingestion": {
        "tile_size": args.tile_size, "stride": args.tile_size, "input_size": args.input_size,
        "group_pattern": args.group_pattern}}
    nested_set(local, f"{args.model}.training.epochs", args.epochs)
    write_parameters(project, args.env, local, args.set)

    pipeline = f"cross_validate_{args.model}"
    runs = [run(project, pipeline, args.env, args.label, args.model, args.kill_after)]
    if args.kill_after is not None:
        runs.append(run(project, pipeline, args.env, f"{args.label}-resumed", args.model))
    print(json.dumps({"runs": runs, "parameters": local, **results(project, args.model)}),
          flush=True)


if __name__ == "__main__":
    main()
