"""Ingestion throughput and peak memory: before vs after reduced decoding and worker processes,
against a bare "decode + resize" loop, on the same files in one run.

Why: ingestion decodes every image twice (manifest checks, then tiles) and must keep memory
bounded as the data grows. Each variant runs in a fresh process (so its peak memory is its own)
and the variants are interleaved for ``--rounds`` rounds: on a shared machine other jobs only
ever slow a round down, so the best round of each is the headline, the median beside it.

Variants (``build_image_manifest`` + ``tile_images`` + ``write_tile_store``, as the pipeline):

- ``before``: the code of ``--before-src`` (a ``src`` folder exported from an older commit,
  e.g. ``git archive 93f85af^ src | tar -x -C /tmp/before``), if given;
- ``full x1``, ``full xN``, ``reduced x1``, ``reduced xN``: this code with ``decoding`` full or
  reduced, on 1 or N (``--workers``) processes;
- ``bare decode+resize``: read, decode at native size, cut the grid, resize every tile (no
  checks, no tissue rule, no store), one process; ``bare draft+resize`` the same with JPEG
  draft decoding at the reduced scale.

Peak memory: the variant's main process (``ru_maxrss``) and, sampled every 50 ms from /proc,
the proportional set size (PSS: shared pages split between the processes sharing them) of the
main process and all its descendants (fork server, workers) together. CPU: the CPU seconds of
all those processes per image (sampled the same way), which a shared machine's load does not
change much, unlike wall time.

    .venv/bin/python benchmarks/bench_ingestion.py [RAW] [--tile-size 512] [--input-size 224]
        [--limit N] [--workers 2] [--rounds 2] [--before-src /tmp/before/src]

RAW defaults to ../shared/data/bach/images (``<Class>/<file>.jpg``: each image is its own
group). Tile stores are written to a temporary folder and deleted. Prints a table and one JSON
line.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[1]
DEFAULT_RAW = PROJECT.parent / "shared" / "data" / "bach" / "images"

logger = logging.getLogger("bench_ingestion")


def limited_view(raw: Path, limit: int, dest: Path) -> Path:
    """Symlinks the first ``limit`` files, taken from the classes in turn, into ``dest``."""
    per_class = [
        sorted(p for p in class_dir.rglob("*") if p.is_file())
        for class_dir in sorted(raw.iterdir())
        if class_dir.is_dir()
    ]
    chosen = [p for p in itertools.chain(*itertools.zip_longest(*per_class)) if p][:limit]
    for path in chosen:
        link = dest / path.relative_to(raw)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path.resolve())
    return dest


def peak_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo.extend(int(c) for c in task.read_text().split())
            except OSError:
                continue
    return found


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


class TreeMemory:
    """Peak PSS of this process and all its descendants, and their CPU time, sampled in a
    thread (Linux; a worker's CPU is its last sample, within ``every_s`` of its end)."""

    def __init__(self, every_s: float = 0.05):
        self.every_s, self.peak_kb = every_s, 0
        self.cpu_ticks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def cpu_s(self) -> float:
        return sum(self.cpu_ticks.values()) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = _descendants(os.getpid())
            self.peak_kb = max(self.peak_kb, sum(_pss_kb(pid) for pid in pids))
            for pid in pids:
                self.cpu_ticks[pid] = max(self.cpu_ticks.get(pid, 0), _cpu_ticks(pid))
            self._stop.wait(self.every_s)


# ----------------------------------------------------------------------------- one variant


def run_pipeline(raw: Path, overrides: dict[str, Any], before_src: str | None) -> dict[str, Any]:
    """The ingestion nodes as the pipeline runs them; in a fresh process (see ``main``)."""
    if before_src:
        sys.path.insert(0, before_src)
    # lazy: which source tree is imported depends on the variant
    from neuroblastoma_cnn.datasets import write_tile_store  # noqa: PLC0415
    from neuroblastoma_cnn.params import IngestionParams, base_parameters  # noqa: PLC0415
    from neuroblastoma_cnn.pipelines.ingestion import nodes  # noqa: PLC0415

    base = base_parameters()["ingestion"]
    raw_params = {**base, **overrides}
    known = set(IngestionParams.model_fields)
    params = IngestionParams.parse({k: v for k, v in raw_params.items() if k in known},
                                   "ingestion")
    with tempfile.TemporaryDirectory(prefix="bench_ingestion_") as tmp:
        start = time.perf_counter()
        manifest, _ = nodes.build_image_manifest(raw, params)
        manifest_s = time.perf_counter() - start
        stream = nodes.tile_images(raw, manifest, params)
        store = write_tile_store(Path(tmp) / "tiles", stream, stream.metadata,
                                 shard_size=params.shard_size)
        wall_s = time.perf_counter() - start
        n_tiles = len(store)
        shutil.rmtree(Path(tmp) / "tiles")
    return {"images": len(manifest), "tiles": n_tiles, "wall_s": wall_s, "manifest_s": manifest_s,
            "source": str(Path(nodes.__file__).parents[3])}


def run_bare(raw: Path, tile_size: int, input_size: int, draft: int) -> dict[str, Any]:
    """Read, decode, cut the grid and resize every tile: the floor any ingestion pays."""
    from PIL import Image  # noqa: PLC0415  (lazy: as the other variants)

    files = sorted(p for p in raw.rglob("*") if p.is_file())
    n_tiles = 0
    start = time.perf_counter()
    for path in files:
        with Image.open(io.BytesIO(path.read_bytes())) as image:
            if draft > 1:
                image.draft("RGB", (image.width // draft, image.height // draft))
            rgb = image.convert("RGB")
        side = tile_size // draft
        for y in range(0, rgb.height - side + 1, side):
            for x in range(0, rgb.width - side + 1, side):
                tile = rgb.crop((x, y, x + side, y + side))
                if side != input_size:
                    tile = tile.resize((input_size, input_size), Image.Resampling.BILINEAR)
                tile.tobytes()
                n_tiles += 1
    return {"images": len(files), "tiles": n_tiles, "wall_s": time.perf_counter() - start,
            "manifest_s": 0.0, "source": "bare Pillow loop"}


def child(args: argparse.Namespace) -> None:
    spec = json.loads(args.child)
    logging.basicConfig(level=logging.WARNING)
    with TreeMemory() as memory:
        if spec["kind"] == "bare":
            result = run_bare(args.raw, args.tile_size, args.input_size, spec["draft"])
        else:
            result = run_pipeline(args.raw, spec["overrides"], spec.get("before_src"))
    result["main_peak_mb"] = peak_mb(resource.RUSAGE_SELF)
    result["tree_peak_mb"] = memory.peak_kb / 1024
    result["cpu_s"] = memory.cpu_s
    print(json.dumps(result))


# ----------------------------------------------------------------------------- the run


def variants(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    grid = {"tile_size": args.tile_size, "stride": args.tile_size,
            "input_size": args.input_size}
    out: dict[str, dict[str, Any]] = {}
    if args.before_src:
        out["before"] = {"kind": "pipeline", "overrides": grid, "before_src": args.before_src}
    for decoding, workers in (("full", 1), ("full", args.workers), ("reduced", 1),
                              ("reduced", args.workers)):
        out[f"{decoding} x{workers}"] = {
            "kind": "pipeline", "workers": workers,
            "overrides": {**grid, "decoding": decoding, "workers": workers}}
    draft = 1
    while args.tile_size // (2 * draft) >= args.input_size and args.tile_size % (2 * draft) == 0:
        draft *= 2
    out["bare decode+resize"] = {"kind": "bare", "draft": 1}
    out[f"bare draft 1/{draft}+resize"] = {"kind": "bare", "draft": draft}
    return out


def run_variant(args: argparse.Namespace, raw: Path, spec: dict[str, Any]) -> dict[str, Any]:
    command = [sys.executable, __file__, str(raw), "--tile-size", str(args.tile_size),
               "--input-size", str(args.input_size), "--child", json.dumps(spec)]
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"{spec} failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", nargs="?", type=Path, default=DEFAULT_RAW)
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--limit", type=int, default=None,
                        help="use only this many images, taken from the classes in turn")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--before-src", default=None,
                        help="src folder of the code to compare against (older commit)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not args.raw.is_dir():
        parser.error(f"raw folder '{args.raw}' does not exist")
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_ingestion_raw_") as tmp:
        raw = limited_view(args.raw, args.limit, Path(tmp) / "raw") if args.limit else args.raw
        specs = variants(args)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in specs}
        for round_ in range(args.rounds):
            for name, spec in specs.items():
                runs[name].append(run_variant(args, raw, spec))
                logger.info("round %d %-24s %.1f s", round_ + 1, name, runs[name][-1]["wall_s"])
    table = summarise(runs, specs)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average at start "
                   f"{load:.1f}, at end {os.getloadavg()[0]:.1f}",
        "raw": str(args.raw) + (f" (first {args.limit} images)" if args.limit else ""),
        "tile_size": args.tile_size, "input_size": args.input_size, "rounds": args.rounds,
        "variants": table,
    }
    print_table(result)
    print(json.dumps(result))
    return 0


def summarise(runs: dict[str, list[dict[str, Any]]],
              specs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    reference = min(r["wall_s"] for r in runs["full x1"])
    for name, results in runs.items():
        best = min(r["wall_s"] for r in results)
        images = results[0]["images"]
        main_mb = max(r["main_peak_mb"] for r in results)
        tree_mb = max(r["tree_peak_mb"] for r in results)
        table[name] = {
            "images": images, "tiles": results[0]["tiles"],
            "images_per_s (best, median)": [
                round(images / best, 2),
                round(images / statistics.median(r["wall_s"] for r in results), 2)],
            "wall_s best": round(best, 1),
            "manifest_s best": round(min(r["manifest_s"] for r in results), 1),
            "speed vs full x1": round(reference / best, 2),
            # CPU seconds of every process, per image: what the variant costs whatever the
            # load of a shared machine
            "cpu_s per image (median)": round(
                statistics.median(r["cpu_s"] for r in results) / images, 3),
            "peak_mb main (rss), all processes (pss)": [round(main_mb), round(tree_mb)],
        }
    return table


def print_table(result: dict[str, Any]) -> None:
    for key, value in result.items():
        if key != "variants":
            print(f"{key}: {value}")
    columns = list(next(iter(result["variants"].values())))
    print(" | ".join(["variant", *columns]))
    for name, row in result["variants"].items():
        print(" | ".join([name, *(str(row[c]) for c in columns)]))


if __name__ == "__main__":
    sys.exit(main())
