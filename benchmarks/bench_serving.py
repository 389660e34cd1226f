"""Serving throughput: ``mlflow models serve`` (the raw-image pyfunc) against
``neuroblastoma-cnn predict`` on the same images, in the same run.

Logs the model's raw-image pyfunc to a throw-away SQLite store, predicts ``--n`` images (spread
over the classes' folders) with the command line, then starts the real scoring server on
127.0.0.1 and posts the same files as base64, ``--per-request`` images per request. Prints one
JSON line: the command's wall time and its own prediction time (from its log), the server's
start-up time and its wall time for all requests, images per second for each, their ratio,
and the largest probability difference between the two (they run the same code).

    python benchmarks/bench_serving.py --model data/06_models/resnet34/model.keras/<v>/model.keras
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd

from neuroblastoma_cnn.params import PredictParams, base_group
from neuroblastoma_cnn.serving.pyfunc import log_raw_image_model

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
logger = logging.getLogger("bench_serving")


def spread(images: Path, n: int) -> list[Path]:
    """``n`` images taken in turn from each class folder (sorted), so every class is served."""
    folders = sorted(p for p in images.iterdir() if p.is_dir())
    lists = [sorted(f for f in folder.iterdir() if f.is_file()) for folder in folders]
    chosen: list[Path] = []
    for i in range(max(map(len, lists))):
        chosen += [files[i] for files in lists if i < len(files)]
    return chosen[:n]


def cli_predict(model: Path, files: list[Path], out: Path, batch_size: int) -> tuple[float, float]:
    """Wall seconds of the command, and the prediction seconds its summary line reports."""
    started = time.perf_counter()
    result = subprocess.run(
        [str(BIN / "neuroblastoma-cnn"), "predict", "-m", str(model), "-o", str(out),
         "--batch-size", str(batch_size), *map(str, files)],
        capture_output=True, text=True, check=False,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"predict failed:\n{result.stderr[-3000:]}")
    found = re.search(r"Predicted \d+ images \(\d+ tiles\) in ([\d.]+)s", result.stderr)
    return wall, float(found.group(1)) if found else float("nan")


def predict_in_process(model_file: Path, files: list[Path], settings: PredictParams) -> float:
    """Seconds of the prediction itself (model loaded, warmed on one image): what both the
    command and the server spend per request, without start-up."""
    from neuroblastoma_cnn.datasets.keras_model import load_keras_model  # noqa: PLC0415
    from neuroblastoma_cnn.pipelines.predict.nodes import predict_files  # noqa: PLC0415

    model = load_keras_model(model_file)
    pairs = [(f.name, f) for f in files]
    predict_files(pairs[:1], model, settings)
    started = time.perf_counter()
    predict_files(pairs, model, settings)
    return time.perf_counter() - started


def logged_pyfunc(model: Path, workdir: Path, experiment: str, **settings: object
                  ) -> tuple[str, PredictParams, str]:
    """The model's raw-image pyfunc logged to a throw-away SQLite store in ``workdir``:
    ``(store URI, prediction settings, model URI)``."""
    store = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    mlflow.set_experiment(experiment)
    params = PredictParams.parse(
        base_group("predict", model=str(model), workers=1, gradcam=False, **settings),
        "predict")
    with mlflow.start_run():
        uri = log_raw_image_model(model, params, name=f"{experiment}_raw_images")
    return store, params, uri


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(port: int, rows: list[list[str]]) -> list[dict]:
    body = json.dumps({"dataframe_split": {"columns": ["file", "image"], "data": rows}}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=900) as response:
        return json.loads(response.read())["predictions"]


def serve(uri: str, store: str, workdir: Path) -> tuple[subprocess.Popen, int, float]:
    port = free_port()
    started = time.perf_counter()
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        stdout=(workdir / "server.log").open("w"), stderr=subprocess.STDOUT,
        start_new_session=True, cwd=workdir,
        env={**os.environ, "MLFLOW_TRACKING_URI": store, "TF_CPP_MIN_LOG_LEVEL": "3",
             "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
    while True:
        if server.poll() is not None:
            raise SystemExit((workdir / "server.log").read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                return server, port, time.perf_counter() - started
        except OSError:
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a .keras file")
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared/data/bach/images")
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--per-request", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    files = spread(args.images, args.n)
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        workdir = Path(tmp)
        store, settings, uri = logged_pyfunc(args.model, workdir, "bench_serving",
                                             batch_size=args.batch_size)
        cli_wall, cli_predict_s = cli_predict(args.model, files, workdir / "cli.csv",
                                              args.batch_size)
        in_process_s = predict_in_process(args.model, files, settings)
        expected = pd.read_csv(workdir / "cli.csv")
        expected["file"] = [Path(f).name for f in expected["file"]]
        server, port, startup = serve(uri, store, workdir)
        try:
            rows = [[f.name, base64.b64encode(f.read_bytes()).decode()] for f in files]
            started = time.perf_counter()
            served = []
            for i in range(0, len(rows), args.per_request):
                served += post(port, rows[i:i + args.per_request])
            serve_wall = time.perf_counter() - started
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
    served_frame = pd.DataFrame(served).set_index("file")
    columns = [c for c in expected.columns if c.startswith("prob_")]
    diff = (served_frame.loc[expected["file"], columns].to_numpy()
            - expected[columns].to_numpy())
    print(json.dumps({
        "images": len(files), "per_request": args.per_request,
        "cli_wall_s": round(cli_wall, 2), "cli_predict_s": cli_predict_s,
        "in_process_predict_s": round(in_process_s, 2),
        "in_process_images_per_s": round(len(files) / in_process_s, 3),
        "serve_vs_in_process": round(in_process_s / serve_wall, 3),
        "server_startup_s": round(startup, 2), "serve_wall_s": round(serve_wall, 2),
        "cli_images_per_s": round(len(files) / cli_wall, 3),
        "cli_predict_images_per_s": round(len(files) / cli_predict_s, 3),
        "serve_images_per_s": round(len(files) / serve_wall, 3),
        "serve_vs_cli_wall": round(cli_wall / serve_wall, 3),
        "serve_vs_cli_predict": round(cli_predict_s / serve_wall, 3),
        "max_abs_prob_diff": float(abs(diff).max()),
        "errors": int((served_frame["error"] != "").sum()),
    }))


if __name__ == "__main__":
    main()
