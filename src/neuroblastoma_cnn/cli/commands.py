"""The ``neuroblastoma-cnn`` command: classify images with a trained model from a shell.

It calls the prediction pipeline's own functions (``predict_files``, ``gradcam_overlays``) with
the ``predict`` parameters of ``conf/base/parameters_predict.yml`` (options override them), so a
file gets the same result here as in ``kedro run --pipeline=predict``. Only click and the
standard library are imported until the arguments are parsed: ``--help`` and usage errors
answer at once, and TensorFlow is loaded only when there is something to predict.

Kedro also imports ``<package>.cli`` to find project commands, and refuses to start (``kedro
run`` included) unless it defines a click group named ``cli``: hence the empty group ``cli``
beside ``main``, the group of this command.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from neuroblastoma_cnn.cli.study_command import study
from neuroblastoma_cnn.core.errors import ParameterError, ProjectError
from neuroblastoma_cnn.models import families
from neuroblastoma_cnn.models.families import Capability
from neuroblastoma_cnn.tracking.prune import prune

EXIT_OK = 0
EXIT_REJECTED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

PROG = "neuroblastoma-cnn"
EXIT_CODES = """\b
exit codes:
  0  every file was predicted (flags such as low_confidence do not count as failures)
  1  some files were rejected (not an image, corrupt, too small...); the others were
     predicted and written, the 'reason' column says why
  2  usage or model error (bad option, missing path, no file found, model not found or
     unusable, output exists): nothing was predicted
"""
DEFAULTS_NOTE = "default: the predict parameters in conf/base/parameters_predict.yml"
MODELS_DIR = "data/06_models"

logger = logging.getLogger(PROG)


@click.group(name="neuroblastoma_cnn")
def cli() -> None:
    """Project commands for `kedro` (none beyond Kedro's own; see `neuroblastoma-cnn`)."""


@click.group(name=PROG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="neuroblastoma-cnn", prog_name=PROG)
def main_group() -> None:
    """Classify H&E histology images with a trained ResNet."""


main_group.add_command(prune)  # old data and model versions (see neuroblastoma_cnn.tracking.prune)
main_group.add_command(study)  # kedro run --pipeline=study (see cli/study_command.py)


@main_group.command(
    "predict", epilog=EXIT_CODES, context_settings={"help_option_names": ["-h", "--help"]},
)
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("-m", "--model", metavar="MODEL",
              help=f"a trained model's name ({', '.join(families.trainable())}: its latest "
                   "version in --models-dir), a .keras file, or an MLflow model URI "
                   f"models:/NAME/VERSION or runs:/RUN_ID/model ({DEFAULTS_NOTE})")
@click.option("--version", "model_version", metavar="VERSION",
              help="a saved version of the architecture's model (default: latest)")
@click.option("--head", metavar="NAME",
              help="classify the model's features with this scikit-learn head (svm, tree, "
                   "logreg, hgb) fitted by `kedro run --pipeline=<model>_features`; refused "
                   "unless fitted on this very model")
@click.option("--models-dir", default=MODELS_DIR, show_default=True, metavar="DIR",
              help="where trained models are saved (the catalog's trained_models path)")
@click.option("--tracking-uri", metavar="URI",
              help="MLflow tracking URI for models:/ and runs:/ (default: $MLFLOW_TRACKING_URI, "
                   "else sqlite:///mlflow.db when ./mlflow.db exists, as in the Kedro project)")
@click.option("-o", "--out", metavar="CSV",
              help="write the predictions here (default: standard output)")
@click.option("--tiles-out", metavar="CSV",
              help="also write one row per tile used, with its probabilities (and each slide's "
                   "tiles for QuPath, <file>.geojson, beside it unless --heatmaps is given)")
@click.option("--gradcam", metavar="DIR",
              help="write a Grad-CAM overlay PNG of the predicted class per image")
@click.option("--heatmaps", metavar="DIR",
              help="write each slide's class heatmaps over its thumbnail (<file>.heatmap.png) "
                   "and its tiles for QuPath (<file>.geojson)")
@click.option("--overwrite", is_flag=True, help="replace existing output files")
@click.option("--batch-size", type=int, metavar="N", help=f"tiles per model call ({DEFAULTS_NOTE})")
@click.option("--workers", type=int, metavar="N",
              help="threads decoding images while the model runs")
@click.option("--min-confidence", type=float, metavar="P",
              help="flag low_confidence below this top probability")
@click.option("--fallback-tiles", type=int, metavar="N",
              help="tiles with the most tissue used for a mostly-background image")
@click.option("--gradcam-max-side", type=int, metavar="PX",
              help="shrink overlays to at most this many pixels a side")
@click.option("--max-image-pixels", type=int, metavar="N",
              help="refuse, before decoding, an image declaring more pixels than this (lowers "
                   "the model's own limit, predict.max_image_pixels)")
@click.option("-q", "--quiet", is_flag=True, help="no progress bar, no summary")
@click.option("-v", "--verbose", is_flag=True, help="log what happens")
def predict(**options: Any) -> int:
    """Classify every image in the given files and folders (any depth) with a trained model.

    Images are tiled exactly as the model's training images were (settings from the model's
    own record); an image's probabilities are the mean of its tiles'. Writes one CSV row per
    file: file, predicted, prob_<class>..., n_tiles, low_confidence, mostly_background,
    rejected, reason. Whole-slide images (.svs, pyramidal TIFF...) are read region by region
    (a progress bar over their tiles); their row is the mean of their tiles, with share_<class>;
    with --tiles-out or --heatmaps, each slide's tiles also go to <file>.geojson, a QuPath
    GeoJSON (File > Import objects) of tiles classified with their probabilities. A model
    calibrated by `kedro run --pipeline=select_model` adds prediction_set (the classes it
    cannot rule out, joined by |) and refer (true: the set is not one class; look at it).
    """
    if options["quiet"] and options["verbose"]:
        raise click.UsageError("--quiet and --verbose exclude each other")
    with _command_logging(options["verbose"]):
        return _predict(options)


@contextmanager
def _command_logging(verbose: bool) -> Iterator[None]:
    """Log lines to stderr only, at WARNING unless verbose; the caller's logging state comes
    back afterwards (the command also runs in-process: tests, notebooks).

    Kedro configures logging when it is imported inside a project (conf/logging.yml: a rich
    handler on stdout, this package at INFO), which would mix log lines into the CSV: hence
    the root handlers are replaced, not added to.
    """
    level = logging.INFO if verbose else logging.WARNING
    root = logging.getLogger()
    # The summary says what the pipeline's warnings would, so those stay quiet unless verbose.
    levels = {__package__: level,
              **dict.fromkeys(("neuroblastoma_cnn.pipelines.predict", "neuroblastoma_cnn.serving"),
                              level if verbose else logging.ERROR)}
    handlers, root_level = root.handlers[:], root.level
    before = {name: logging.getLogger(name).level for name in levels}
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name, value in levels.items():
        logging.getLogger(name).setLevel(value)
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(root_level)
        for name, value in before.items():
            logging.getLogger(name).setLevel(value)


class CommandUsageError(ParameterError):
    """A problem with what was asked (paths, outputs), found before predicting; exit code 2."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``neuroblastoma-cnn`` script; returns the exit code."""
    try:
        code = main_group.main(args=argv, prog_name=PROG, standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return EXIT_USAGE
    except click.Abort:
        click.echo(f"{PROG}: interrupted", err=True)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        click.echo(f"{PROG}: interrupted", err=True)
        return EXIT_INTERRUPTED
    except ProjectError as exc:  # CommandUsageError, parameters, model, data
        click.echo(f"{PROG}: error: {exc.one_line()}", err=True)
        return EXIT_USAGE
    return int(code or 0)


# ----------------------------------------------------------------------------- the work


def _params(options: dict[str, Any]) -> Any:
    """The predict parameters: YAML defaults, then the options given, validated."""
    from neuroblastoma_cnn.params import PredictParams, base_group  # noqa: PLC0415  (lazy)

    overrides = {
        "model": options["model"], "version": options["model_version"], "head": options["head"],
        "batch_size": options["batch_size"], "workers": options["workers"],
        "min_confidence": options["min_confidence"],
        "background_fallback_tiles": options["fallback_tiles"],
        "gradcam_max_side": options["gradcam_max_side"],
        "max_image_pixels": options["max_image_pixels"],
    }
    given = {key: value for key, value in overrides.items() if value is not None}
    given["gradcam"] = options["gradcam"] is not None
    return PredictParams.parse(base_group("predict", _conf_base(), **given), "predict")


def _conf_base() -> Path | None:
    """The project's conf/base when run from a project folder; else the package's own."""
    here = Path("conf/base")
    return here if (here / "parameters_predict.yml").is_file() else None


def _check_outputs(options: dict[str, Any]) -> None:
    if options["gradcam"] and options["head"] and not families.family("feature_heads").able(
            Capability.GRADCAM):
        raise CommandUsageError("--gradcam shows where the CNN's own classifier looked; it "
                                "cannot explain a --head: drop one of them.")
    for option, value in (("--out", options["out"]), ("--tiles-out", options["tiles_out"])):
        if value and Path(value).exists() and not options["overwrite"]:
            raise CommandUsageError(f"{option} '{value}' exists; pass --overwrite to replace it.")
    for option in ("gradcam", "heatmaps"):
        if not options.get(option):
            continue
        folder = Path(options[option])
        if folder.exists() and not folder.is_dir():
            raise CommandUsageError(f"--{option} '{folder}' is a file, not a folder.")
        if folder.is_dir() and any(folder.iterdir()) and not options["overwrite"]:
            raise CommandUsageError(f"--{option} folder '{folder}' is not empty; pass "
                                    "--overwrite to write into it.")


def _collect(paths: list[str]) -> tuple[list[tuple[str, Path]], dict[str, str]]:
    """``(name, path)`` of every file named or found under a named folder, without repeats,
    and each name's short name (relative to its folder argument; a file's own name).

    Names are the paths as typed (``folder/sub/file.jpg``), so the CSV says which file is which;
    overlays are named by short names, unless two short names collide.
    """
    from neuroblastoma_cnn.pipelines.predict.nodes import list_image_files  # noqa: PLC0415

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
    import mlflow  # noqa: PLC0415  (lazy: only for MLflow model URIs)

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri and Path("mlflow.db").exists():
        uri = f"sqlite:///{Path('mlflow.db').resolve().as_posix()}"
    if uri:
        mlflow.set_tracking_uri(uri)


def _predict(options: dict[str, Any]) -> int:
    paths = list(options["paths"])
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise CommandUsageError(f"no such file or folder: {', '.join(repr(p) for p in missing)}")
    _check_outputs(options)
    params = _params(options)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported
    # Heavy imports (TensorFlow through the model) only now that there is work to do.
    from neuroblastoma_cnn.datasets.trained_models import TrainedModels  # noqa: PLC0415

    files, short_names = _collect(paths)
    if not files:
        raise CommandUsageError(f"no files found in {', '.join(paths)}")
    _check_geojson_outputs(files, short_names, options)
    _configure_mlflow(params.model, options["tracking_uri"])
    model = TrainedModels(options["models_dir"]).load(params.model, params.version)
    if params.head is not None:  # extractor + scikit-learn head, refused unless fitted on it
        from neuroblastoma_cnn.datasets.sklearn_heads import head_classifier  # noqa: PLC0415

        model = head_classifier(options["models_dir"], model, params.head)
    predictions, tiles = _classify(files, model, params, options)
    not_drawn = _draw(files, short_names, model, predictions, tiles, params, options)
    not_drawn += _draw_heatmaps(files, short_names, model, predictions, tiles, params, options)
    n_geojson = _write_geojson(short_names, model, predictions, tiles, options)
    rejected = predictions[predictions["rejected"]]
    if not options["quiet"]:
        _print_summary(predictions, model, options, not_drawn, n_geojson)
    return EXIT_REJECTED if len(rejected) else EXIT_OK


def _classify(files: list[tuple[str, Path]], model: Any, params: Any,
              options: dict[str, Any]) -> Any:
    from tqdm import tqdm  # noqa: PLC0415  (lazy, with the rest of the work)
    from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: PLC0415

    from neuroblastoma_cnn.pipelines.predict.nodes import predict_files  # noqa: PLC0415

    bar_off = True if options["quiet"] else None  # None: a bar only on a terminal

    def tile_bar(name: str, total: int) -> Any:  # one bar over a slide's tiles
        bar = tqdm(total=total, desc=f"  {Path(name).name}", unit="tile", file=sys.stderr,
                   disable=bar_off, leave=False)
        return lambda n: (bar.update(n), bar.n >= total and bar.close())

    with logging_redirect_tqdm(), tqdm(total=len(files), desc="Predicting", unit="image",
                                       file=sys.stderr, disable=bar_off) as bar:
        predictions, tiles = predict_files(files, model, params, progress=bar.update,
                                           tile_progress=tile_bar)
    _write_csv(predictions, options["out"])
    if options["tiles_out"]:
        _write_csv(tiles, options["tiles_out"])
    return predictions, tiles


def _draw(files: list[tuple[str, Path]], short_names: dict[str, str], model: Any,
          predictions: Any, tiles: Any, params: Any, options: dict[str, Any]) -> int:
    """Writes the Grad-CAM overlays asked for; returns how many could not be drawn."""
    if not options["gradcam"]:
        return 0
    from neuroblastoma_cnn.pipelines.predict.nodes import (  # noqa: PLC0415
        gradcam_overlays,
        overlay_name,
    )

    folder = Path(options["gradcam"])
    folder.mkdir(parents=True, exist_ok=True)
    jobs = gradcam_overlays(files, model, predictions, params, tiles)
    return _save_pictures(jobs, folder, lambda file: overlay_name(short_names[file]),
                          "Grad-CAM", options)


def _draw_heatmaps(files: list[tuple[str, Path]], short_names: dict[str, str], model: Any,
                   predictions: Any, tiles: Any, params: Any, options: dict[str, Any]) -> int:
    """Writes the slides' class heatmaps if asked; returns how many could not be drawn."""
    if not options["heatmaps"]:
        return 0
    from neuroblastoma_cnn.pipelines.predict.nodes import (  # noqa: PLC0415
        heatmap_name,
        slide_heatmaps,
    )

    folder = Path(options["heatmaps"])
    folder.mkdir(parents=True, exist_ok=True)
    jobs = slide_heatmaps(files, model, predictions, tiles, params)
    return _save_pictures(jobs, folder, lambda file: heatmap_name(short_names[file]),
                          "Heatmaps", options)


def _geojson_folder(options: dict[str, Any]) -> Path | None:
    """Where slides' QuPath GeoJSON go: the heatmaps folder, else beside the tile CSV."""
    if options["heatmaps"]:
        return Path(options["heatmaps"])
    return Path(options["tiles_out"]).parent if options["tiles_out"] else None


def _check_geojson_outputs(files: list[tuple[str, Path]], short_names: dict[str, str],
                           options: dict[str, Any]) -> None:
    """Beside the tile CSV, a slide's ``<file>.geojson`` is not replaced without --overwrite
    (the heatmaps folder is checked whole)."""
    if options["heatmaps"] or not options["tiles_out"] or options["overwrite"]:
        return
    from neuroblastoma_cnn.images.slides import is_slide  # noqa: PLC0415
    from neuroblastoma_cnn.pipelines.predict.nodes import geojson_name  # noqa: PLC0415

    folder = _geojson_folder(options)
    for name, path in files:
        target = folder / geojson_name(short_names[name]) if folder else None
        if target is not None and target.exists() and is_slide(path):
            raise CommandUsageError(f"'{target}' exists; pass --overwrite to replace it.")


def _write_geojson(short_names: dict[str, str], model: Any, predictions: Any, tiles: Any,
                   options: dict[str, Any]) -> int:
    """Writes each predicted slide's QuPath GeoJSON where :func:`_geojson_folder` says;
    returns how many."""
    folder = _geojson_folder(options)
    if folder is None:
        return 0
    import json  # noqa: PLC0415

    from neuroblastoma_cnn.pipelines.predict.nodes import (  # noqa: PLC0415
        geojson_name,
        preprocessing_of,
        slide_geojsons,
    )

    collections = slide_geojsons(predictions, tiles, list(preprocessing_of(model).classes))
    for file, collection in collections.items():
        path = folder / geojson_name(short_names[file])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(collection))
        logger.info("QuPath GeoJSON of '%s': %s", file, path)
    return len(collections)


def _save_pictures(jobs: dict[str, Any], folder: Path, name: Any, what: str,
                   options: dict[str, Any]) -> int:
    """Draws and saves each picture (a bar over them); returns how many could not be drawn."""
    from tqdm import tqdm  # noqa: PLC0415  (lazy, with the rest of the work)
    from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: PLC0415

    from neuroblastoma_cnn.datasets.png_folder import save_picture  # noqa: PLC0415

    not_drawn = 0
    with logging_redirect_tqdm():
        for file, draw in tqdm(jobs.items(), desc=what, unit="image", file=sys.stderr,
                               disable=True if options["quiet"] else None):
            picture = draw()
            if picture is None:
                not_drawn += 1
            else:
                save_picture(picture, folder / name(file))
    return not_drawn


def _print_summary(predictions: Any, model: Any, options: dict[str, Any], not_drawn: int,
                   n_geojson: int) -> None:
    rejected = predictions[predictions["rejected"]]
    done = len(predictions) - len(rejected)
    where = f" -> {options['out']}" if options["out"] else ""
    echo = lambda text: click.echo(text, err=True)  # noqa: E731
    echo(f"{done} of {len(predictions)} files predicted with {model.model_source}{where}; "
         f"{int(predictions['low_confidence'].sum())} low confidence, "
         f"{int(predictions['mostly_background'].sum())} mostly background, "
         f"{len(rejected)} rejected")
    if "refer" in predictions.columns:
        echo(f"{int(predictions['refer'].sum())} referred (prediction set not one class, at "
             f"coverage {model.preprocessing.conformal['coverage']:g})")
    for row in rejected.head(10).itertuples(index=False):
        echo(f"  rejected {row.file}: {row.reason}")
    if len(rejected) > 10:
        echo(f"  ... and {len(rejected) - 10} more (see the 'reason' column)")
    if options["heatmaps"]:
        echo(f"Slide heatmaps in {options['heatmaps']}")
    if n_geojson:
        echo(f"{n_geojson} slide(s) for QuPath (<file>.geojson: File > Import objects) in "
             f"{_geojson_folder(options)}")
    if options["gradcam"]:
        echo(f"Grad-CAM overlays in {options['gradcam']}"
             + (f"; {not_drawn} could not be drawn (-v says why)" if not_drawn else ""))


def _write_csv(frame: Any, out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(out, index=False)
    else:
        frame.to_csv(sys.stdout, index=False)


if __name__ == "__main__":
    sys.exit(main())
