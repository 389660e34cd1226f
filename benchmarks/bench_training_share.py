"""Where the wall time of `kedro run --pipeline=train_resnet34` goes: model.fit vs the rest.

Why: everything around ``model.fit`` (splitting, augmentation, evaluation, MLflow logging;
ingestion aside) should cost at most 5% of a training run. This runs the pipeline in-process,
as ``kedro run`` does, in a throw-away project on BACH (raw images linked read-only), with a
hook that timestamps every node and a wrapper that times every ``keras.Model.fit`` call.

A node's time runs from its start to the next node's start (so saving its outputs and loading
the next inputs count), the last node's to the end of the run; MLflow set-up and the final
logging are the time before the first node and after the last one.

    python benchmarks/bench_training_share.py --epochs 10 [--decoding reduced] [--workdir DIR]

Prints a per-node table and one JSON line (with the test macro-F1, to compare decoding
methods on the same settings).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")

import keras
from bach_end_to_end import latest, make_project
from kedro.framework.hooks import hook_impl
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

ROOT = Path(__file__).resolve().parents[1]
INGESTION_NODES = ("build_image_manifest", "tile_images")


class NodeClock:
    """Start time of every node, in run order."""

    def __init__(self) -> None:
        self.starts: list[tuple[str, float]] = []

    @hook_impl
    def before_node_run(self, node: Any) -> None:
        self.starts.append((node.name, time.perf_counter()))


class FitClock:
    """Wraps ``keras.Model.fit`` to add up the time spent in it."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._fit = keras.Model.fit

    def __enter__(self) -> FitClock:
        clock, fit = self, self._fit

        def timed_fit(model: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fit(model, *args, **kwargs)
            finally:
                clock.seconds += time.perf_counter() - started
                clock.calls += 1

        keras.Model.fit = timed_fit
        return self

    def __exit__(self, *exc: object) -> None:
        keras.Model.fit = self._fit


def run(project: Path, params: dict[str, Any]) -> tuple[float, float, list, FitClock]:
    bootstrap_project(project)
    nodes, fits = NodeClock(), FitClock()
    cwd = Path.cwd()
    os.chdir(project)
    try:
        with KedroSession.create(project_path=project, runtime_params=params) as session:
            session._hook_manager.register(nodes)  # benchmark only: no settings.py change
            with fits:
                started = time.perf_counter()
                session.run(pipeline_names=["train_resnet34"])
                ended = time.perf_counter()
    finally:
        os.chdir(cwd)
    return started, ended, nodes.starts, fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared/data/bach/images")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--decoding", default="reduced", choices=["full", "reduced"])
    parser.add_argument("--group-pattern", default=None,
                        help=r"e.g. '^(?P<group>[a-z]+\d\d)\d' (BACH's blocks of ten)")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bach-share-"))
    project = make_project(workdir, args.images)
    # Nested, as `kedro run --params` gives them: the parameter models refuse dotted keys.
    ingestion = {"tile_size": args.tile_size, "stride": args.tile_size,
                 "input_size": args.input_size, "decoding": args.decoding}
    if args.group_pattern:
        ingestion["group_pattern"] = args.group_pattern
    params = {"ingestion": ingestion, "resnet34": {"training": {"epochs": args.epochs}}}
    started, ended, starts, fits = run(project, params)

    bounds = [t for _, t in starts] + [ended]
    per_node = {name: bounds[i + 1] - bounds[i] for i, (name, _) in enumerate(starts)}
    ingestion_s = sum(s for name, s in per_node.items() if name in INGESTION_NODES)
    total_s = ended - started
    setup_s = bounds[0] - started
    without_ingestion = total_s - ingestion_s
    outside_fit = without_ingestion - fits.seconds
    for name, seconds in per_node.items():
        print(f"{name:<50} {seconds:8.1f} s")
    metrics = json.loads(latest(project / "data/08_reporting/resnet34/test_metrics.json")
                         .read_text())
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average at start "
                   f"{load:.1f}, at end {os.getloadavg()[0]:.1f}",
        "decoding": args.decoding, "group_pattern": args.group_pattern, "epochs": args.epochs,
        "tile_size": args.tile_size, "input_size": args.input_size,
        "run_s": round(total_s, 1), "ingestion_s": round(ingestion_s, 1),
        "before_first_node_s (MLflow set-up)": round(setup_s, 1),
        "model.fit_s": round(fits.seconds, 1), "fit_calls": fits.calls,
        "outside_fit_s (ingestion aside)": round(outside_fit, 1),
        "outside_fit_share (ingestion aside)": round(outside_fit / without_ingestion, 4),
        "nodes_s": {k: round(v, 1) for k, v in per_node.items()},
        "test_f1_macro": round(metrics["f1_macro"], 3),
        "test_f1_macro_ci95": [round(metrics["macro_f1_ci"]["low"], 3),
                               round(metrics["macro_f1_ci"]["high"], 3)],
        "test_accuracy": round(metrics["accuracy"], 3),
        "test_tile_f1_macro": round(metrics["tile"]["f1_macro"], 3),
        "workdir": str(workdir),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
