"""Checks that run before anything else does, for what a later node will need.

Why: a mistyped environment, an empty raw folder or unreachable ResNet50 weights used to surface
only after MLflow set-up, ingestion, tiling and augmentation had run (minutes to hours on real
data), each leaving a new data version and a FAILED MLflow run. Each check here takes well
under a second (the weights check at most its network timeout) and raises a ProjectError that
says what is wrong and what to do.
"""

from __future__ import annotations

import importlib
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from neuroblastoma_cnn.core.errors import DataError, ModelError, ParameterError, ProjectError
from neuroblastoma_cnn.images.slides import SLIDE_EXTENSIONS

logger = logging.getLogger(__name__)

RAW_LAYOUT = "<Class>/<Patient>/<image>, see README.md 'Raw data'"
DEFAULT_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
NETWORK_TIMEOUT_S = 5.0


# ------------------------------------------------------------------------------ environment


#: The Keras backend the project runs on: tf.data input, TensorFlow's fused kernels and its
#: multi-worker strategy. JAX and PyTorch trained the ResNet34 about 10x slower on a CPU
#: (README "Training speed").
KERAS_BACKEND = "tensorflow"


def check_keras_backend(environ: dict[str, str] | None = None) -> None:
    """``KERAS_BACKEND`` names TensorFlow or nothing: Keras would otherwise load another backend
    (or fail to import one that is not installed) deep inside the first training node."""
    chosen = (os.environ if environ is None else environ).get("KERAS_BACKEND", KERAS_BACKEND)
    if chosen.strip().lower() != KERAS_BACKEND:
        raise ParameterError(
            f"KERAS_BACKEND={chosen}: this project trains and predicts on Keras' TensorFlow "
            f"backend (tf.data input, fused kernels); unset KERAS_BACKEND or set it to "
            f"tensorflow (README 'Training speed' has the other backends' figures).")


def environments(conf_source: Path) -> list[str]:
    """Configuration environments: the folders of ``conf_source``."""
    if not conf_source.is_dir():
        return []
    return sorted(p.name for p in conf_source.iterdir()
                  if p.is_dir() and not p.name.startswith((".", "_")))


def check_environment(conf_source: str | Path, env: str | None, default_env: str | None) -> None:
    """The ``--env`` folder exists. The default environment (``local``, git-ignored) may be
    absent: Kedro then reads ``base`` alone."""
    source = Path(conf_source)
    if env is None or env == default_env or not source.is_dir():  # packaged or remote config
        return
    if (source / env).is_dir():
        return
    known = [e for e in environments(source) if e != "base"]
    raise ProjectError(
        f"Environment '{env}' does not exist: there is no folder '{source.name}/{env}'. "
        f"Environments: {', '.join(known) or 'none besides base'}",
        hint=f"run with --env={known[0]}" if len(known) == 1 else
        "pick one with --env=NAME; KEDRO_ENV sets the default",
    )


# ------------------------------------------------------------------------------ raw images

def shown(path: Path) -> str:
    """``path`` relative to the working directory (the project root) when inside it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def first_image(folder: Path, extensions: Iterable[str] | None) -> Path | None:
    """The first file with one of ``extensions`` (any file for None) under ``folder`` (any
    depth, hidden files and folders skipped), or None."""
    suffixes = (None if extensions is None else
                {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions})
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and (suffixes is None
                                             or Path(name).suffix.lower() in suffixes):
                return Path(root) / name
    return None


def check_folder_has_files(folder: str | Path, name: str) -> None:
    """An input folder (e.g. the images to classify) exists and holds at least one file."""
    path = Path(folder)
    hint = f"put the files in {shown(path)} (catalog entry '{name}')"
    if not path.is_dir():
        raise DataError(f"The folder '{shown(path)}' ({name}) does not exist", hint=hint)
    if first_image(path, None) is None:
        raise DataError(f"The folder '{shown(path)}' ({name}) holds no file", hint=hint)


def check_raw_images(folder: str | Path, extensions: Iterable[str] | None = None,
                     demo_env: bool = False) -> None:
    """The raw image folder exists and holds at least one image file."""
    path = Path(folder)
    extensions = list(extensions or DEFAULT_EXTENSIONS)
    hint = f"put images in {shown(path)}/{RAW_LAYOUT}"
    if demo_env:
        hint += "; or try the demo data: kedro run --env=demo"
    if not path.is_dir():
        raise DataError(f"The raw image folder '{shown(path)}' does not exist", hint=hint)
    if first_image(path, [*extensions, *sorted(SLIDE_EXTENSIONS)]) is None:  # slides count
        raise DataError(
            f"No image in '{shown(path)}' (no file ending in {', '.join(extensions)})",
            hint=hint,
        )


# ------------------------------------------------------------------------------ weights

def keras_cache_dir() -> Path:
    """Where Keras caches downloads (``$KERAS_HOME/models``, default ``~/.keras/models``)."""
    home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    return Path(home) / "models"


def url_reachable(url: str, timeout: float = NETWORK_TIMEOUT_S) -> bool:
    """Whether a HEAD request to ``url`` gets an answer within ``timeout`` seconds."""
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (OSError, ValueError):
        return False


def check_weights(key: str, weights: Any) -> None:
    """``weights`` of a model parameter block: "imagenet" must be cached or downloadable, a
    path must exist, None needs nothing."""
    if weights is None:
        return
    if str(weights) == "imagenet":
        # Loaded only here: the module imports Keras, which only a model-building run needs.
        resnet50 = importlib.import_module("neuroblastoma_cnn.models.resnet50")
        file, url = resnet50.IMAGENET_FILE, resnet50.IMAGENET_URL
        cached = keras_cache_dir() / file
        if cached.is_file() or url_reachable(url):
            return
        raise ModelError(
            f"{key}=imagenet: the ImageNet ResNet50 weights are not in Keras' cache "
            f"('{cached}') and {url} cannot be reached",
            hint=f"download {file} elsewhere and put it in that cache or set "
                 f"{key}=/path/to/{file}; {key}=null trains from random weights",
        )
    path = Path(str(weights)).expanduser()
    if not path.is_file():
        raise ParameterError(
            f"{key}='{weights}': no such weights file",
            hint="give an existing .h5 / .weights.h5 / .keras file, 'imagenet' or null",
        )


def model_weight_params(pipeline: Any, parameters: Any) -> list[tuple[str, Any]]:
    """``(key, weights)`` of every ``params:<ns>.model`` block the pipeline reads that has
    ``weights``: the models this run will build."""
    found = []
    for name in sorted(pipeline.inputs() | {i for n in pipeline.nodes for i in n.inputs}):
        if not (name.startswith("params:") and name.endswith(".model")):
            continue
        block = lookup(parameters, name[len("params:"):])
        weights = _get(block, "weights", _MISSING)
        if weights is not _MISSING:
            found.append((f"{name[len('params:'):]}.weights", weights))
    return found


_MISSING = object()


def _get(block: Any, key: str, default: Any = None) -> Any:
    """``block[key]`` of a dict, or the attribute of a (pydantic) parameter model."""
    if isinstance(block, dict):
        return block.get(key, default)
    block = getattr(block, "root", block)  # a RootModel (one of several parameter models)
    return getattr(block, key, default)


def lookup(parameters: Any, dotted: str) -> Any:
    """``parameters["a"]["b"]`` for ``"a.b"``; None when a key is missing."""
    value = parameters
    for part in dotted.split("."):
        value = _get(value, part)
        if value is None:
            return None
    return value


# ------------------------------------------------------------------------------ tracking server

def shown_uri(uri: str) -> str:
    """A tracking URI without any password in it (``http://user:secret@host`` -> ``http://user@host``)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def check_tracking_server(uri: str, timeout: float = NETWORK_TIMEOUT_S) -> None:
    """An HTTP tracking server answers, and accepts this process's credentials
    (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``), before any training starts.

    Why: MLflow reports either only once a run logs something, as a multi-line traceback; a
    team server with logins refuses an anonymous or mistyped user with 401."""
    if not uri.startswith(("http://", "https://")):
        return
    import base64  # noqa: PLC0415

    shown = shown_uri(uri)
    parts = urllib.parse.urlsplit(uri)
    bare = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    request = urllib.request.Request(
        bare.rstrip("/") + "/api/2.0/mlflow/experiments/search",
        data=b'{"max_results": 1}', headers={"Content-Type": "application/json"})
    user, password = (parts.username or os.environ.get("MLFLOW_TRACKING_USERNAME"),
                      parts.password if parts.username
                      else os.environ.get("MLFLOW_TRACKING_PASSWORD"))
    if user and password is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            who = f"user '{user}'" if user else "no user (anonymous)"
            raise ProjectError(
                f"The MLflow tracking server {shown} refused {who}: HTTP {exc.code}",
                hint="set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the "
                     "environment to an account of that server (README 'Working as a team')",
            ) from None
        raise ProjectError(f"The MLflow tracking server {shown} answered HTTP {exc.code}",
                           hint="check MLFLOW_TRACKING_URI and the server's log") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ProjectError(
            f"The MLflow tracking server {shown} is unreachable ({reason})",
            hint="start it (README 'Working as a team') or point MLFLOW_TRACKING_URI at it; "
                 "unset MLFLOW_TRACKING_URI to track in the project's own mlflow.db",
        ) from None
