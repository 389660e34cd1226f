"""The ``neuroblastoma-cnn`` command: classify images with a trained model from a shell.

It calls the prediction pipeline's own functions (``predict_files``, ``gradcam_overlays``), so a
file gets the same result here as in ``kedro run --pipeline=predict`` with the same parameters.
Only the standard library (and click, for Kedro, below) is imported until the arguments are
parsed: ``--help`` and usage errors answer at once, and TensorFlow is loaded only when there is
something to predict.

Kedro also imports ``<package>.cli`` to find project commands, and refuses to start (``kedro
run`` included) unless it defines a click group named ``cli``: hence the empty group below.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import click

EXIT_OK = 0
EXIT_REJECTED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

PROG = "neuroblastoma-cnn"
EXIT_CODES = """\
exit codes:
  0  every file was predicted (flags such as low_confidence do not count as failures)
  1  some files were rejected (not an image, corrupt, too small...); the others were
     predicted and written, the 'reason' column says why
  2  usage or model error (bad option, missing path, no file found, model not found or
     unusable, output exists): nothing was predicted
"""

logger = logging.getLogger(PROG)


@click.group(name="neuroblastoma_cnn")
def cli() -> None:
    """Project commands for `kedro` (none beyond Kedro's own; see `neuroblastoma-cnn`)."""


class UsageError(Exception):
    """A problem with what was asked; reported in one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    from neuroblastoma_cnn import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, description="Classify H&E histology images with a trained ResNet.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    predict = commands.add_parser(
        "predict",
        help="classify image files or folders, optionally with Grad-CAM overlays",
        description=textwrap.fill(
            "Classify every image in the given files and folders (any depth) with a trained "
            "model. Images are tiled exactly as the model's training images were (settings "
            "from the model's own record); an image's probabilities are the mean of its "
            "tiles'. Writes one CSV row per file: file, predicted, prob_<class>..., n_tiles, "
            "low_confidence, mostly_background, rejected, reason.", width=88,
        ),
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    predict.add_argument(
        "-m", "--model", default="resnet34", metavar="MODEL",
        help="architecture name (its latest trained version in --models-dir), a .keras file, "
             "or an MLflow model URI models:/NAME/VERSION or runs:/RUN_ID/model "
             "(default: %(default)s)",
    )
    predict.add_argument("--version", dest="model_version", default=None, metavar="VERSION",
                         help="a saved version of the architecture's model (default: latest)")
    predict.add_argument("--models-dir", default="data/06_models", metavar="DIR",
                         help="where trained models are saved (default: %(default)s)")
    predict.add_argument(
        "--tracking-uri", default=None, metavar="URI",
        help="MLflow tracking URI for models:/ and runs:/ (default: $MLFLOW_TRACKING_URI, "
             "else sqlite:///mlflow.db when ./mlflow.db exists, as in the Kedro project)",
    )
    predict.add_argument("-o", "--out", metavar="CSV",
                         help="write the predictions here (default: standard output)")
    predict.add_argument("--tiles-out", metavar="CSV",
                         help="also write one row per tile used, with its probabilities")
    predict.add_argument("--gradcam", metavar="DIR",
                         help="write a Grad-CAM overlay PNG of the predicted class per image")
    predict.add_argument("--overwrite", action="store_true",
                         help="replace existing output files")
    tuning = predict.add_argument_group("prediction settings (defaults: the predict parameters)")
    tuning.add_argument("--batch-size", type=_positive_int, metavar="N",
                        help="tiles per model call (32)")
    tuning.add_argument("--workers", type=_positive_int, metavar="N",
                        help="threads decoding images while the model runs (2)")
    tuning.add_argument("--min-confidence", type=_probability, metavar="P",
                        help="flag low_confidence below this top probability (0.6)")
    tuning.add_argument("--fallback-tiles", type=_positive_int, metavar="N",
                        help="tiles with the most tissue used for a mostly-background image (3)")
    tuning.add_argument("--gradcam-max-side", type=_positive_int, metavar="PX",
                        help="shrink overlays to at most this many pixels a side (2048)")
    output = predict.add_mutually_exclusive_group()
    output.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    output.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number within [0, 1], got '{text}'")
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``neuroblastoma-cnn`` script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # the summary below says what the pipeline's warnings would
        logging.getLogger("neuroblastoma_cnn.pipelines.predict").setLevel(logging.ERROR)
    try:
        return _predict(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {
        "model": args.model, "version": args.model_version, "batch_size": args.batch_size,
        "workers": args.workers, "min_confidence": args.min_confidence,
        "background_fallback_tiles": args.fallback_tiles,
        "gradcam_max_side": args.gradcam_max_side, "gradcam": args.gradcam is not None,
    }
    return {key: value for key, value in overrides.items() if value is not None}


def _check_outputs(args: argparse.Namespace) -> None:
    for option, value in (("--out", args.out), ("--tiles-out", args.tiles_out)):
        if value and Path(value).exists() and not args.overwrite:
            raise UsageError(f"{option} '{value}' exists; pass --overwrite to replace it.")
    if args.gradcam:
        folder = Path(args.gradcam)
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"--gradcam '{folder}' is a file, not a folder.")
        if folder.is_dir() and any(folder.iterdir()) and not args.overwrite:
            raise UsageError(f"--gradcam folder '{folder}' is not empty; pass --overwrite to "
                             "write into it.")


def _collect(paths: list[str]) -> tuple[list[tuple[str, Path]], dict[str, str]]:
    """``(name, path)`` of every file named or found under a named folder, without repeats,
    and each name's short name (relative to its folder argument; a file's own name).

    Names are the paths as typed (``folder/sub/file.jpg``), so the CSV says which file is which;
    overlays are named by short names, unless two short names collide.
    """
    from neuroblastoma_cnn.pipelines.predict.nodes import list_image_files

    seen: set[Path] = set()
    files: list[tuple[str, Path]] = []
    short: dict[str, str] = {}
    for raw in paths:
        path = Path(raw)
        found = ([(path.name, path)] if path.is_file() else list_image_files(path))
        for rel, file in found:
            key = file.resolve()
            if key in seen:
                continue
            seen.add(key)
            name = path.as_posix() if path.is_file() else Path(os.path.normpath(path / rel))
            files.append((Path(name).as_posix(), file))
            short[Path(name).as_posix()] = rel
    if len(set(short.values())) < len(short):
        short = {name: name for name in short}
    return files, short


def _configure_mlflow(model: str, tracking_uri: str | None) -> None:
    if not model.startswith(("models:/", "runs:/")):
        return
    import mlflow

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri and Path("mlflow.db").exists():
        uri = f"sqlite:///{Path('mlflow.db').resolve().as_posix()}"
    if uri:
        mlflow.set_tracking_uri(uri)


def _predict(args: argparse.Namespace) -> int:
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        raise UsageError(f"no such file or folder: {', '.join(repr(p) for p in missing)}")
    _check_outputs(args)
    params = _settings(args)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from neuroblastoma_cnn.datasets.png_folder import save_picture
    from neuroblastoma_cnn.datasets.trained_models import ModelSelectionError, TrainedModels
    from neuroblastoma_cnn.pipelines.predict.nodes import (
        PredictSettings,
        Preprocessing,
        gradcam_overlays,
        overlay_name,
        predict_files,
    )

    try:
        PredictSettings.from_params(params)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    files, short_names = _collect(args.paths)
    if not files:
        raise UsageError(f"no files found in {', '.join(args.paths)}")
    _configure_mlflow(args.model, args.tracking_uri)
    try:
        model = TrainedModels(args.models_dir).load(args.model, args.model_version)
        Preprocessing.from_model(model)
    except (ModelSelectionError, ValueError) as exc:
        raise UsageError(str(exc)) from exc

    bar_off = True if args.quiet else None  # None: a bar only on a terminal
    with logging_redirect_tqdm(), tqdm(total=len(files), desc="Predicting", unit="image",
                                       file=sys.stderr, disable=bar_off) as bar:
        predictions, tiles = predict_files(files, model, params, progress=bar.update)
    _write_csv(predictions, args.out)
    if args.tiles_out:
        _write_csv(tiles, args.tiles_out)
    not_drawn = 0
    if args.gradcam:
        folder = Path(args.gradcam)
        folder.mkdir(parents=True, exist_ok=True)
        jobs = gradcam_overlays(files, model, predictions, params)
        with logging_redirect_tqdm():
            for file, draw in tqdm(jobs.items(), desc="Grad-CAM", unit="image",
                                   file=sys.stderr, disable=bar_off):
                picture = draw()
                if picture is None:
                    not_drawn += 1
                else:
                    save_picture(picture, folder / overlay_name(short_names[file]))

    rejected = predictions[predictions["rejected"]]
    if not args.quiet:
        done = len(predictions) - len(rejected)
        where = f" -> {args.out}" if args.out else ""
        print(f"{done} of {len(predictions)} files predicted with {model.model_source}{where}; "
              f"{int(predictions['low_confidence'].sum())} low confidence, "
              f"{int(predictions['mostly_background'].sum())} mostly background, "
              f"{len(rejected)} rejected", file=sys.stderr)
        for row in rejected.head(10).itertuples(index=False):
            print(f"  rejected {row.file}: {row.reason}", file=sys.stderr)
        if len(rejected) > 10:
            print(f"  ... and {len(rejected) - 10} more (see the 'reason' column)",
                  file=sys.stderr)
        if args.gradcam:
            print(f"Grad-CAM overlays in {args.gradcam}"
                  + (f"; {not_drawn} could not be drawn (-v says why)" if not_drawn else ""),
                  file=sys.stderr)
    return EXIT_REJECTED if len(rejected) else EXIT_OK


def _write_csv(frame: Any, out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(out, index=False)
    else:
        frame.to_csv(sys.stdout, index=False)


if __name__ == "__main__":
    sys.exit(main())
