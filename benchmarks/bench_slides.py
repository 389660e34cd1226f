"""Whole-slide images: memory, throughput, and agreement with crops, on BACH-built slides.

Everything derived from BACH is written under ``--workdir`` (a temporary folder; BACH's licence).

    .venv/bin/python benchmarks/bench_slides.py write       # 40,000 x 40,000 px pyramidal TIFF
    .venv/bin/python benchmarks/bench_slides.py train       # a small CNN on BACH crops (minutes)
    .venv/bin/python benchmarks/bench_slides.py resnet      # an untrained ResNet34 at 224 px
    .venv/bin/python benchmarks/bench_slides.py memory --whole [--model resnet34_224.keras]
                                                            # peak RSS: `predict big.tif` vs whole
    .venv/bin/python benchmarks/bench_slides.py throughput  # our tiling vs a bare tiffslide loop
    .venv/bin/python benchmarks/bench_slides.py agreement   # single-class slides vs crops; heatmap
    .venv/bin/python benchmarks/bench_slides.py regions     # 50 QuPath regions over big.tif
    .venv/bin/python benchmarks/bench_slides.py annotated   # ingestion tiles/s and peak RSS:
                                                            # annotated vs unannotated big.tif

The model (``train``): BACH images of the four classes downscaled 4x (1.68 um/px, BACH being
0.42 um/px), tiles of 128 px = 215 um (``tile_um`` in its record, so it tiles a full-resolution
slide at 512 px), resized to 64 px; three conv blocks, a few epochs. The big slide tiles four
full-resolution BACH images (one per class) in a cycle at 0.42 um/px, levels 1, 1/4, 1/16, 1/64,
JPEG tiles of 512 px, written tile by tile.

The regions (``regions``): 50 irregular polygons of 60 vertices (radius 1,500-3,000 px, every
fifth with a hole), two classes, seeded, over big.tif as a QuPath GeoJSON export. ``annotated``
runs ingestion's two nodes (manifest, then every tile of the stream) in a fresh process each,
on big.tif in a class folder (today's path) and at the top with its regions, alternately,
under ``/usr/bin/time``: tiles per second (tiles kept / both nodes' time), the same after the
first tile (once the files are checked and the slide planned), and peak RSS.
``NEUROBLASTOMA_CNN_SLIDE_READER=tiffslide`` measures the other reader.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

import numpy as np  # noqa: E402
from _slides import bach_image, side_by_side, write_large_slide, write_slide  # noqa: E402
from PIL import Image  # noqa: E402

CLASSES = ["Benign", "InSitu", "Invasive", "Normal"]
READER = "NEUROBLASTOMA_CNN_SLIDE_READER"  # auto (OpenSlide if installed), openslide, tiffslide
BACH_MPP = 0.42
DOWN = 4
TILE_UM = 128 * BACH_MPP * DOWN  # 215.04 um
TRAIN_IMAGES = 40  # per class (images 0..39); images 60.. are left for the slides


def _ingestion(**overrides):
    from neuroblastoma_cnn.params import IngestionParams, base_group  # noqa: PLC0415

    values = {"tile_size": 128, "stride": None, "input_size": 64, "workers": 1,
              "tile_um": TILE_UM, **overrides}
    return IngestionParams.parse(base_group("ingestion", **values), "ingestion")


def write(work: Path, side: int) -> None:
    sources = [bach_image(label, 60, downscale=1) for label in CLASSES]
    started = time.perf_counter()
    path = write_large_slide(work / "big.tif", sources, side, side, mpp=BACH_MPP)
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in "
          f"{time.perf_counter() - started:.0f}s")


def train(work: Path, epochs: int) -> None:
    import keras  # noqa: PLC0415

    from neuroblastoma_cnn.datasets import save_keras_model  # noqa: PLC0415
    from neuroblastoma_cnn.images.preprocessing import Preprocessing, attach_preprocessing  # noqa: PLC0415
    from neuroblastoma_cnn.pipelines.ingestion.nodes import (  # noqa: PLC0415
        build_image_manifest,
        tile_images,
    )

    raw = work / "train_raw"
    for label in CLASSES:
        (raw / label).mkdir(parents=True, exist_ok=True)
        for i in range(TRAIN_IMAGES):
            Image.fromarray(bach_image(label, i, DOWN)).save(raw / label / f"{i:03d}.png")
    settings = _ingestion()
    manifest, _ = build_image_manifest(raw, settings)
    records = list(tile_images(raw, manifest, settings))
    x = np.stack([t for t, _ in records]).astype(np.float32)
    y = np.array([CLASSES.index(str(m["label"])) for _, m in records], dtype=np.int64)
    order = np.random.default_rng(0).permutation(len(x))  # validation: a random 15% of tiles
    x, y = x[order], y[order]
    cut = int(0.85 * len(x))
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64, 64, 3))
    h = keras.layers.Rescaling(1 / 255)(inputs)
    for filters in (16, 32, 64):
        h = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(h)
        h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(h))
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    started = time.perf_counter()
    history = model.fit(x[:cut], y[:cut], epochs=epochs, batch_size=64, verbose=0,
                        validation_data=(x[cut:], y[cut:]), shuffle=True)
    record = Preprocessing(classes=CLASSES, image_checks=settings.image_checks,
                           tiling=settings.tiling, architecture="resnet34")
    attach_preprocessing(model, record, "bench model")
    save_keras_model(model, work / "model.keras")
    print(f"trained on {len(x)} tiles in {time.perf_counter() - started:.0f}s: accuracy "
          f"{history.history['accuracy'][-1]:.2f}, val {history.history['val_accuracy'][-1]:.2f}")


def resnet(work: Path) -> None:
    """An untrained ResNet34 at 224 px with a 215 um (512 px at 0.42 um/px) tiling record:
    weights do not change memory or the cost of a forward pass."""
    from neuroblastoma_cnn.datasets import save_keras_model  # noqa: PLC0415
    from neuroblastoma_cnn.images.preprocessing import Preprocessing  # noqa: PLC0415
    from neuroblastoma_cnn.models.families import build_model  # noqa: PLC0415

    settings = _ingestion(tile_size=512, input_size=224)
    model = build_model("resnet34", 224, len(CLASSES), seed=0)
    model.preprocessing = Preprocessing(classes=CLASSES, image_checks=settings.image_checks,
                                        tiling=settings.tiling, architecture="resnet34")
    save_keras_model(model, work / "resnet34_224.keras")


def _max_rss_mb(command: list[str]) -> tuple[float, float, str]:
    """Peak RSS (MB) and seconds of ``command``, and what it printed."""
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True,
                          check=False)
    seconds = time.perf_counter() - started
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    if done.returncode != 0 or not found:
        raise RuntimeError(done.stderr[-2000:])
    return int(found.group(1)) / 1024, seconds, done.stdout


def memory(work: Path, model: str, whole_too: bool) -> None:
    cli = str(Path(sys.executable).with_name("neuroblastoma-cnn"))
    out = work / f"big_out_{Path(model).stem}"
    rss, seconds, _ = _max_rss_mb([
        cli, "predict", str(work / "big.tif"), "-m", str(work / model), "-q",
        "--overwrite", "-o", str(out / "predictions.csv"), "--tiles-out",
        str(out / "tiles.csv"), "--heatmaps", str(out / "heat"), "--gradcam", str(out / "cam")])
    tiles = (out / "tiles.csv").read_text().count("\n") - 1
    print(f"predict big.tif with {model}: peak RSS {rss:.0f} MB, {seconds:.0f}s, {tiles} tiles")
    print(json.dumps({"predict_peak_mb": round(rss), "tiles": tiles, "model": model}))
    if not whole_too:
        return
    whole = ("import tifffile,sys; a = tifffile.imread(sys.argv[1], level=0); "
             "print(a.shape, a.nbytes)")
    try:
        rss_whole, seconds, _ = _max_rss_mb([sys.executable, "-c", whole,
                                             str(work / "big.tif")])
        print(f"decode whole level 0 (tifffile.imread): peak RSS {rss_whole:.0f} MB, "
              f"{seconds:.0f}s")
    except RuntimeError as exc:
        print(f"decode whole failed: {str(exc)[-300:]}")


def throughput(work: Path, rounds: int) -> None:
    import tiffslide  # noqa: PLC0415

    from neuroblastoma_cnn.images.slides import (  # noqa: PLC0415
        chosen_tiles,
        iter_slide_tiles,
        open_slide,
        slide_grid,
        tissue_fractions,
    )

    tiling = _ingestion().tiling
    path = work / "big.tif"
    ours, bare = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        with open_slide(path) as slide:
            grid = slide_grid(slide, tiling)
            fractions = tissue_fractions(slide, grid, tiling)
            kept, _ = chosen_tiles(fractions, tiling.min_tissue_fraction, None)
            n = sum(1 for _ in iter_slide_tiles(slide, grid, fractions, kept, 64))
        ours.append(time.perf_counter() - started)
        positions = [grid.positions[i] for i in kept]
        started = time.perf_counter()
        raw = tiffslide.TiffSlide(path)
        for x, y in positions:
            raw.read_region((x, y), grid.read_level, (grid.read_side, grid.read_side),
                            as_array=True)
        raw.close()
        bare.append(time.perf_counter() - started)
    print(f"{n} of {len(grid.positions)} tiles (level {grid.read_level}, {grid.read_side} px "
          f"read, 64 px out); ours best {min(ours):.1f}s ({n / min(ours):.0f} tiles/s), bare "
          f"tiffslide loop best {min(bare):.1f}s ({n / min(bare):.0f} tiles/s): ratio "
          f"{min(bare) / min(ours):.2f}x; all rounds ours {[round(t, 1) for t in ours]}, "
          f"bare {[round(t, 1) for t in bare]}")


def agreement(work: Path, per_slide: int) -> None:
    from neuroblastoma_cnn.datasets import load_keras_model  # noqa: PLC0415
    from neuroblastoma_cnn.params import PredictParams, base_group  # noqa: PLC0415
    from neuroblastoma_cnn.pipelines.predict import nodes  # noqa: PLC0415

    model = load_keras_model(work / "model.keras")
    params = PredictParams.parse(base_group("predict", workers=1, gradcam=False), "predict")
    folder = work / "agreement"
    folder.mkdir(exist_ok=True)
    for label in CLASSES:
        images = [bach_image(label, 60 + i, DOWN) for i in range(per_slide)]
        crops = []
        for i, image in enumerate(images):
            crops.append((f"{label}_{i}.png", folder / f"{label}_{i}.png"))
            Image.fromarray(image).save(crops[-1][1])
        slide = write_slide(folder / f"{label}.tif", side_by_side(images), mpp=BACH_MPP * DOWN,
                            tile=128)
        slide_rows, _ = nodes.predict_files([(slide.name, slide)], model, params)
        crop_rows, crop_tiles = nodes.predict_files(crops, model, params)
        columns = [f"prob_{c}" for c in CLASSES]
        crop_mean = crop_tiles[columns].mean().to_numpy()
        row = slide_rows.iloc[0]
        shares = ", ".join(f"{c} {float(row[f'share_{c}']):.2f}" for c in CLASSES)
        print(f"{label}: slide -> {row['predicted']} ({row[f'prob_{row.predicted}']:.2f}; "
              f"shares {shares}); crops -> "
              f"{crop_rows['predicted'].tolist()}; mean of crop tiles -> "
              f"{CLASSES[int(crop_mean.argmax())]}; |slide - crop-tile mean| max "
              f"{np.abs(row[columns].to_numpy(float) - crop_mean).max():.3f}")
    rows = [side_by_side([bach_image(label, 60 + 2 * r + i, DOWN)
                          for label in ("Benign", "Invasive") for i in range(2)])
            for r in range(2)]  # 2 x 4 images: the left half Benign, the right half Invasive
    two = write_slide(folder / "benign_invasive.tif", np.concatenate(rows),
                      mpp=BACH_MPP * DOWN, tile=128)
    result, tiles = nodes.predict_files([(two.name, two)], model, params)
    half = tiles["x"] < 1024
    for name, side in (("left (Benign)", tiles[half]), ("right (Invasive)", tiles[~half])):
        mean = side[[f"prob_{c}" for c in CLASSES]].mean().to_numpy()
        print(f"two-class slide, {name} half: mean of tiles -> {CLASSES[int(mean.argmax())]} "
              f"({mean.max():.2f})")
    picture = nodes.slide_heatmaps([(two.name, two)], model, result, tiles,
                                   params)[two.name]()
    target = Path("/tmp/wsi_heatmap_benign_invasive.png")
    picture.save(target)
    print(f"two-class slide -> {result.iloc[0]['predicted']}; heatmap {target}")


def regions(work: Path, n_regions: int, side: int) -> None:
    """``big.geojson``: ``n_regions`` seeded star-shaped polygons, half of each class."""
    from _slides import write_qupath_geojson  # noqa: PLC0415

    rng = np.random.default_rng(0)
    specs = []
    for i in range(n_regions):
        cx, cy = rng.uniform(4_000, side - 4_000, 2)
        radius = rng.uniform(1_500, 3_000)
        angles = np.sort(rng.uniform(0, 2 * np.pi, 60))
        lengths = radius * rng.uniform(0.7, 1.0, 60)
        ring = [(float(cx + r * np.cos(a)), float(cy + r * np.sin(a)))
                for a, r in zip(angles, lengths, strict=True)]
        rings = [[*ring, ring[0]]]
        if i % 5 == 0:  # a hole in the middle
            hole = [(float(cx + 0.3 * radius * np.cos(a)), float(cy + 0.3 * radius * np.sin(a)))
                    for a in np.linspace(0, 2 * np.pi, 24)]
            rings.append(hole)
        specs.append((f"r{i:02d}", ("Benign", "Invasive")[i % 2], [rings]))
    path = write_qupath_geojson(work / "big.geojson", specs)
    print(f"wrote {path}: {n_regions} regions")


def ingest(work: Path, annotated: bool) -> None:
    """Ingestion's manifest and tiles of big.tif (symlinked into a raw folder): one JSON line."""
    from neuroblastoma_cnn.pipelines.ingestion.nodes import (  # noqa: PLC0415
        build_image_manifest,
        tile_images,
    )

    raw = work / ("raw_annotated" if annotated else "raw_plain")
    folder = raw if annotated else raw / "Benign" / "P1"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("big.tif", "big.geojson") if annotated else ("big.tif",):
        if not (folder / name).exists():
            (folder / name).symlink_to(work / name)
    settings = _ingestion(annotation_classes=["Benign", "Invasive"])
    started = time.perf_counter()
    manifest, _ = build_image_manifest(raw, settings)
    listed = time.perf_counter() - started
    stream = iter(tile_images(raw, manifest, settings))
    tiles = 1 if next(stream, None) is not None else 0
    first = time.perf_counter() - started  # + checking the files and planning the slide again
    tiles += sum(1 for _ in stream)
    seconds = time.perf_counter() - started
    print(json.dumps({"annotated": annotated, "reader": os.environ.get(READER, "auto"),
                      "tiles": tiles, "seconds": round(seconds, 2),
                      "manifest_seconds": round(listed, 2), "first_tile_seconds": round(first, 2),
                      "tiles_per_s": round(tiles / seconds, 1),
                      "streaming_tiles_per_s": round((tiles - 1) / (seconds - first), 1)}))


def annotated_vs_plain(work: Path, rounds: int) -> None:
    """``ingest`` plain and annotated, alternately, each in a fresh process under
    ``/usr/bin/time`` (peak RSS); the best round of each."""
    results: dict[bool, list[dict]] = {False: [], True: []}
    for _ in range(rounds):
        for annotated in (False, True):
            command = [sys.executable, __file__, "ingest", "--workdir", str(work)]
            rss, _, out = _max_rss_mb([*command, *(["--annotated"] if annotated else [])])
            line = [x for x in out.splitlines() if x.startswith("{")]
            if not line:
                raise RuntimeError(out[-2000:])
            results[annotated].append({**json.loads(line[-1]), "peak_rss_mb": round(rss)})
            print(json.dumps(results[annotated][-1]))
    best = {k: max(v, key=lambda r: r["tiles_per_s"]) for k, v in results.items()}
    ratio = best[True]["tiles_per_s"] / best[False]["tiles_per_s"]
    streaming = (max(r["streaming_tiles_per_s"] for r in results[True])
                 / max(r["streaming_tiles_per_s"] for r in results[False]))
    print(f"reader {os.environ.get(READER, 'auto')}; unannotated: {best[False]['tiles']} tiles, "
          f"best {best[False]['tiles_per_s']} tiles/s; annotated (50 regions): "
          f"{best[True]['tiles']} tiles, best {best[True]['tiles_per_s']} tiles/s: {ratio:.2f}x "
          f"(after the first tile: {streaming:.2f}x); peak RSS "
          f"{max(r['peak_rss_mb'] for r in results[False])} MB unannotated, "
          f"{max(r['peak_rss_mb'] for r in results[True])} MB annotated")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["write", "train", "resnet", "memory", "throughput",
                                         "agreement", "regions", "ingest", "annotated"])
    parser.add_argument("--annotated", action="store_true", help="ingest: big.tif annotated")
    parser.add_argument("--regions", type=int, default=50, help="regions: how many")
    parser.add_argument("--model", default="model.keras", help="memory: the model file")
    parser.add_argument("--whole", action="store_true", help="memory: also decode it whole")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wsi_bench"))
    parser.add_argument("--side", type=int, default=40_000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--per-slide", type=int, default=4)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    step = args.step
    if step == "write":
        write(args.workdir, args.side)
    elif step == "train":
        train(args.workdir, args.epochs)
    elif step == "resnet":
        resnet(args.workdir)
    elif step == "memory":
        memory(args.workdir, args.model, args.whole)
    elif step == "throughput":
        throughput(args.workdir, args.rounds)
    elif step == "regions":
        regions(args.workdir, args.regions, args.side)
    elif step == "ingest":
        ingest(args.workdir, args.annotated)
    elif step == "annotated":
        annotated_vs_plain(args.workdir, args.rounds)
    else:
        agreement(args.workdir, args.per_slide)


if __name__ == "__main__":
    main()
