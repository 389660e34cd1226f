"""The served raw-image model under load: ``mlflow models serve`` with concurrent clients, one
request in ten carrying a bad image, for a bounded time, on 127.0.0.1 only.

Logs the model's raw-image pyfunc to a throw-away SQLite store, starts the real scoring server
in its own process group (killed at the end, whatever happens), measures its idle memory, posts
the memory-bomb PNG alone (its memory above idle), then runs ``--clients`` threads for
``--minutes``: each posts one image per request, good ones taken in turn from ``--images``, and
every ``--bad-every``-th request one of the bad files (truncated JPEG, text, empty, a 1x1 PNG,
a PNG declaring 100,000 x 100,000 pixels). A request fails when it answers 5xx, hangs past
``--timeout`` seconds, or a bad row comes back without its reason. The server's memory (the
resident memory of every process in its group) is sampled every second.

Prints one JSON object per worker count in ``--server-workers``: throughput, p50/p95/p99
latency, peak memory, memory after warm-up, at minute 1 and at the end, the bomb's memory above
idle, counts of 5xx, hangs and bad rows without a reason.

    python benchmarks/load_serving.py --model data/06_models/resnet34/model.keras/<v>/model.keras \
        --images ../shared/data/bach/images --minutes 5 --server-workers 1 2
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _hostile import bad_images  # the tests' builders of bad files
from bench_serving import free_port, logged_pyfunc  # this folder: run as a script

BIN = Path(sys.executable).parent
logger = logging.getLogger("load_serving")
PAGE = os.sysconf("SC_PAGE_SIZE")


def group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in the group (the server and its workers)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat.rpartition(")")[2].split()
            if int(fields[2]) == pgid:  # field 5: process group
                total += int((entry / "statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
    return total / 2**20


class Sampler(threading.Thread):
    """The group's memory every second, with the time."""

    def __init__(self, pgid: int):
        super().__init__(daemon=True)
        self.pgid, self.samples, self.stop = pgid, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.monotonic(), group_rss_mb(self.pgid)))
            self.stop.wait(1.0)

    def peak_since(self, start: float) -> float:
        return max((m for t, m in self.samples if t >= start), default=float("nan"))

    def at(self, when: float) -> float:
        return min(self.samples, key=lambda s: abs(s[0] - when))[1]


def post(port: int, rows: list[list[str]], timeout: float) -> tuple[int, list[dict] | str]:
    body = json.dumps({"dataframe_split": {"columns": ["file", "image"], "data": rows}}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())["predictions"]
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")[:300]


@contextlib.contextmanager
def server(uri: str, store: str, workdir: Path, workers: int):
    """The scoring server in its own process group on 127.0.0.1; the group is always killed."""
    port = free_port()
    log = workdir / f"server-{workers}.log"
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir,
        env={**os.environ, "MLFLOW_TRACKING_URI": store, "TF_CPP_MIN_LOG_LEVEL": "3",
             "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
    try:
        started = time.monotonic()
        while True:
            if process.poll() is not None:
                raise SystemExit(log.read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except OSError:
                if time.monotonic() - started > 600:
                    raise SystemExit("server did not start in 600 s") from None
                time.sleep(0.5)
        yield process, port
    finally:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=wait)


def _failure(status: int, answer: list[dict] | str, is_bad: bool) -> str | None:
    """Which failure an answer is, if any."""
    if status >= 500:
        return "5xx"
    if status == -1:
        return "hung"
    if status != 200:
        return "4xx" if 400 <= status < 500 else "other"
    error = answer[0]["error"]  # type: ignore[index]
    if is_bad and not error:
        return "bad_without_reason"
    return "good_with_error" if not is_bad and error else None


def load(port: int, good: list[tuple[str, str]], bad: list[tuple[str, str]], clients: int,
         seconds: float, bad_every: int, timeout: float) -> dict:
    """``clients`` threads posting for ``seconds``; returns latencies and failure counts."""
    lock = threading.Lock()
    counter = [0]
    latencies: list[float] = []
    failures = {"5xx": 0, "hung": 0, "4xx": 0, "bad_without_reason": 0,
                "good_with_error": 0, "other": 0}
    examples: list[str] = []
    deadline = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < deadline:
            with lock:
                n = counter[0]
                counter[0] += 1
            is_bad = n % bad_every == bad_every - 1
            name, data = bad[(n // bad_every) % len(bad)] if is_bad else good[n % len(good)]
            started = time.monotonic()
            try:
                status, answer = post(port, [[f"{n}-{name}", data]], timeout)
            except TimeoutError:
                status, answer = -1, "timed out"
            except OSError as exc:
                status, answer = -2, str(exc)
            elapsed = time.monotonic() - started
            outcome = _failure(status, answer, is_bad)
            with lock:
                latencies.append(elapsed)
                if outcome:
                    failures[outcome] += 1
                if status != 200 and len(examples) < 5:
                    examples.append(f"{name}: {status} {str(answer)[:200]}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started
    lat = np.array(latencies)
    return {"requests": len(lat), "wall_s": round(wall, 1),
            "images_per_s": round(len(lat) / wall, 2),
            "p50_s": round(float(np.percentile(lat, 50)), 3),
            "p95_s": round(float(np.percentile(lat, 95)), 3),
            "p99_s": round(float(np.percentile(lat, 99)), 3),
            "max_s": round(float(lat.max()), 3), **failures, "examples": examples}


def _trend(per_minute: list[float]) -> dict:
    """Memory at each minute and its least-squares slope after minute 1 (MB per minute): a
    leak grows without bound, an allocator that has settled stays flat."""
    later = np.array(per_minute[1:])
    slope = (float(np.polyfit(np.arange(len(later)), later, 1)[0]) if len(later) >= 3
             else float("nan"))
    return {"minute_mb": [round(m) for m in per_minute],
            "mb_per_minute_after_minute_1": round(slope, 2)}


def measure(uri: str, store: str, workdir: Path, workers: int, good: list, bad: list,
            args: argparse.Namespace) -> dict:
    with server(uri, store, workdir, workers) as (process, port):
        sampler = Sampler(process.pid)
        sampler.start()
        time.sleep(3)
        idle = group_rss_mb(process.pid)
        bomb = [(n, d) for n, d in bad if n == "bomb.png"]
        before = time.monotonic()
        status, answer = post(port, [["bomb.png", bomb[0][1]]], args.timeout)
        time.sleep(2)
        bomb_peak = sampler.peak_since(before) - idle
        bomb_reason = answer[0]["error"] if status == 200 else f"{status}: {answer}"
        warm = load(port, good, bad, args.clients, args.warmup, args.bad_every, args.timeout)
        start = time.monotonic()
        result = load(port, good, bad, args.clients, args.minutes * 60, args.bad_every,
                      args.timeout)
        end = time.monotonic()
        sampler.stop.set()
        sampler.join()
    return {"server_workers": workers, "clients": args.clients, "minutes": args.minutes,
            "bad_every": args.bad_every, **result,
            "warmup_requests": warm["requests"],
            "idle_mb": round(idle), "after_warmup_mb": round(sampler.at(start)),
            "minute_1_mb": round(sampler.at(start + 60)),
            "end_mb": round(sampler.at(end)), "peak_mb": round(sampler.peak_since(start)),
            **_trend([sampler.at(start + 60 * k) for k in range(1, int(args.minutes) + 1)]),
            "bomb_above_idle_mb": round(bomb_peak), "bomb_answer": bomb_reason[:160]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a .keras file")
    parser.add_argument("--images", type=Path, required=True,
                        help="a folder of good images (any depth)")
    parser.add_argument("--n-images", type=int, default=40, help="good images used in turn")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds of load first")
    parser.add_argument("--bad-every", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--server-workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    files = sorted(p for p in args.images.rglob("*") if p.is_file()
                   and p.suffix.lower() in {".tif", ".tiff", ".png", ".jpg", ".jpeg"})
    step = max(1, len(files) // args.n_images)
    good = [(p.name, base64.b64encode(p.read_bytes()).decode())
            for p in files[::step][:args.n_images]]
    buffer = io.BytesIO()  # a JPEG of the first image: truncated, it is one bad file
    with Image.open(files[0]) as image:
        image.convert("RGB").save(buffer, format="JPEG", quality=90)
    bad = [(n, base64.b64encode(d).decode()) for n, d in bad_images(buffer.getvalue()).items()]
    with tempfile.TemporaryDirectory(prefix="load-serving-") as tmp:
        workdir = Path(tmp)
        store, _, uri = logged_pyfunc(args.model, workdir, "load_serving")
        for workers in args.server_workers:
            print(json.dumps(measure(uri, store, workdir, workers, good, bad, args)),
                  flush=True)


if __name__ == "__main__":
    main()
