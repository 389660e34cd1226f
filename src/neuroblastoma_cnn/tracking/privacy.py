"""Patient privacy: group (patient) ids never leave the machine in clear.

Why: patient folder names are often hospital identifiers, and MLflow trackers are shared or
remote. Every group id that could reach MLflow (logged tables, figure captions, tags) is replaced
by a keyed pseudonym ``g-<12 hex>`` = HMAC-SHA256(secret, id): stable across runs (the same
patient gets the same pseudonym, so results stay comparable), not reversible without the secret,
and not guessable from a list of likely ids (unlike a plain hash). The secret lives in
``conf/local/credentials.yml`` (git-ignored), created on first run; the clear mapping is kept
only in local ``data/02_intermediate/group_pseudonyms.csv/<version>/`` (git-ignored, versioned).

``mlflow_privacy.log_tissue_images: false`` (parameters) keeps tissue pictures (galleries,
augmentation grids; catalog entries marked ``tissue_images: true``) off the tracker.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from kedro.framework.hooks import hook_impl
from pydantic import BaseModel, ConfigDict

from neuroblastoma_cnn.core.errors import ParameterError

logger = logging.getLogger(__name__)

CREDENTIALS_KEY = "neuroblastoma_privacy"
SECRET_FIELD = "group_pseudonym_key"
MAPPING = Path("data/02_intermediate/group_pseudonyms.csv")
TEXT_SUFFIXES = {".csv", ".json", ".txt", ".yml", ".yaml", ".md", ".html", ".tsv"}
GROUP_COLUMNS = ("group",)


class PrivacyParams(BaseModel):
    """``mlflow_privacy`` in conf/base/parameters_privacy.yml."""

    model_config = ConfigDict(extra="forbid")
    pseudonymize_groups: bool
    log_tissue_images: bool


def pseudonym(key: bytes, group: str) -> str:
    return "g-" + hmac.new(key, str(group).encode(), hashlib.sha256).hexdigest()[:12]


def load_or_create_key(credentials_file: Path) -> bytes:
    """The secret from ``credentials.yml``; a new one is appended there when it has none."""
    text = credentials_file.read_text() if credentials_file.exists() else ""
    section = (yaml.safe_load(text) or {}).get(CREDENTIALS_KEY) or {}
    if section.get(SECRET_FIELD):
        return str(section[SECRET_FIELD]).encode()
    secret = secrets.token_hex(32)
    credentials_file.parent.mkdir(parents=True, exist_ok=True)
    block = ("\n# Key of the patient pseudonyms logged to MLflow"
             " (neuroblastoma_cnn.tracking.privacy):\n"
             f"# keep it secret and keep it: a new key gives every patient a new pseudonym.\n"
             f"{CREDENTIALS_KEY}:\n  {SECRET_FIELD}: {secret}\n")
    with credentials_file.open("a") as out:
        out.write(block)
    os.chmod(credentials_file, 0o600)
    logger.info("Created the patient pseudonym key in '%s'", credentials_file)
    return secret.encode()


class Pseudonymizer:
    """Knows the raw group ids seen on this machine and scrubs them from what is logged."""

    def __init__(self, key: bytes, settings: PrivacyParams, mapping_root: Path | None = None):
        self.key = key
        self.settings = settings
        self.mapping_root = mapping_root
        self.groups: dict[str, str] = {}
        self._saved: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        if mapping_root is not None:
            self._read_mapping()

    # ---------------------------------------------------------------- what is known
    def learn(self, names: Iterable[Any]) -> None:
        new = {str(n) for n in names if str(n) and str(n) not in self.groups}
        if new:
            self.groups.update({n: pseudonym(self.key, n) for n in new})
            self._pattern = None

    def learn_from(self, data: Any) -> None:
        """Group ids in a table (column ``group``) or a tile store's index."""
        frame = getattr(data, "index", None) if hasattr(data, "tile_shape") else data
        if isinstance(frame, pd.DataFrame):
            for column in GROUP_COLUMNS:
                if column in frame.columns:
                    self.learn(frame[column].dropna().unique())

    def _regex(self) -> re.Pattern[str] | None:
        if self._pattern is None and self.groups:
            names = sorted(self.groups, key=len, reverse=True)  # longest first
            # A prefix of a longer name counts ("b00" in the file "b001.tif"): over-scrubbing
            # is safe, a leak is not.
            self._pattern = re.compile(
                r"(?<![A-Za-z0-9])(" + "|".join(map(re.escape, names)) + ")")
        return self._pattern

    # ---------------------------------------------------------------- scrubbing
    def scrub_text(self, text: str) -> str:
        pattern = self._regex()
        if pattern is None or not self.settings.pseudonymize_groups:
            return text
        return pattern.sub(lambda m: self.groups[m.group(1)], text)

    def scrub_cell(self, value: str) -> str:
        try:
            float(value)
            return value  # a number, never an id (a group "1" must not rewrite a count of 1)
        except ValueError:
            return self.scrub_text(value)

    def scrub_frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        out = frame.copy()
        out.columns = [self.scrub_cell(str(c)) for c in out.columns]
        for column in out.columns:
            if column in GROUP_COLUMNS:  # every value is an id, numeric-looking or not
                out[column] = out[column].map(lambda v: pseudonym(self.key, v))
            elif out[column].dtype == object or pd.api.types.is_string_dtype(out[column]):
                out[column] = out[column].map(
                    lambda v: self.scrub_cell(v) if isinstance(v, str) else v)
        return out

    def artifact_to_log(self, saved: Path, data: Any, tissue_images: bool,
                        folder: Path) -> Path | None:
        """The file to log instead of ``saved`` (a scrubbed copy in ``folder``), or None when
        it must not be logged at all."""
        if tissue_images and not self.settings.log_tissue_images:
            logger.info("Not logged to MLflow (mlflow_privacy.log_tissue_images: false): %s",
                        saved.name)
            return None
        if not self.settings.pseudonymize_groups or not self.groups:
            return saved
        target = folder / saved.name
        if saved.suffix.lower() == ".csv":
            frame = pd.read_csv(saved, dtype=str, keep_default_na=False)
            self.scrub_frame(frame).to_csv(target, index=False)
        elif saved.suffix.lower() in TEXT_SUFFIXES:
            target.write_text(self.scrub_text(saved.read_text()))
        elif hasattr(data, "savefig") and hasattr(data, "findobj"):
            _save_scrubbed_figure(data, target, self.scrub_text)
        else:
            shutil.copyfile(saved, target)
        return target

    # ---------------------------------------------------------------- the local mapping
    def _read_mapping(self) -> None:
        root = self.mapping_root
        if root is None or not root.is_dir():
            return
        for version in sorted(p for p in root.iterdir() if p.is_dir()):
            table = version / root.name
            if table.is_file():
                frame = pd.read_csv(table, dtype=str, keep_default_na=False)
                self.learn(frame["group"])
        self._saved = set(self.groups)

    def save_mapping(self) -> Path | None:
        """A new version of the clear mapping when this run met new groups."""
        if self.mapping_root is None or set(self.groups) <= self._saved:
            return None
        version = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H.%M.%S.%f")[:-3] + "Z"
        path = self.mapping_root / version / self.mapping_root.name
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(sorted(self.groups.items()), columns=["group", "pseudonym"]).to_csv(
            path, index=False)
        self._saved = set(self.groups)
        logger.info("Saved %d group pseudonyms to '%s' (local only)", len(self.groups), path)
        return path


def _save_scrubbed_figure(figure: Any, target: Path, scrub: Any) -> None:
    """Saves the figure with every text (titles, captions, labels) scrubbed, then restores it."""
    from matplotlib.text import Text  # noqa: PLC0415  (lazy: only for logged figures)

    texts = [(t, t.get_text()) for t in figure.findobj(Text)]
    try:
        for text, value in texts:
            text.set_text(scrub(value))
        figure.savefig(target, dpi=110)
    finally:
        for text, value in texts:
            text.set_text(value)


# -------------------------------------------------------------------- process-wide state

_active: Pseudonymizer | None = None


def active() -> Pseudonymizer | None:
    """The pseudonymizer of the current Kedro session (None outside one: nothing scrubbed)."""
    return _active


def activate(pseudonymizer: Pseudonymizer | None) -> None:
    global _active  # noqa: PLW0603  (one session per process, as Kedro's own hooks assume)
    _active = pseudonymizer


def scrub_text(text: str) -> str:
    return _active.scrub_text(text) if _active is not None else text


def artifact_to_log(saved: Path, data: Any, tissue_images: bool = False) -> tuple[Path | None,
                                                                                    Any]:
    """``(file to log or None, cleanup)`` for MlflowArtifactDataset."""
    if _active is None:
        return saved, None
    folder = Path(tempfile.mkdtemp(prefix="mlflow-private-"))
    return _active.artifact_to_log(saved, data, tissue_images, folder), folder


class PrivacyHook:
    """Creates the key, learns group ids from every table and tile store the run reads or
    writes (before anything is logged from them), and saves the clear mapping locally."""

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        project = Path(context.project_path)
        raw = (context.config_loader.get("parameters") or {}).get("mlflow_privacy")
        if raw is None:
            activate(None)
            return
        try:
            settings = PrivacyParams.model_validate(raw)
        except ValueError as exc:
            raise ParameterError(f"mlflow_privacy: {exc}") from exc
        conf = Path(context.config_loader.conf_source)
        conf = conf if conf.is_absolute() else project / conf
        key = load_or_create_key(conf / "local" / "credentials.yml")
        activate(Pseudonymizer(key, settings, project / MAPPING))

    @hook_impl
    def after_dataset_loaded(self, dataset_name: str, data: Any) -> None:
        if _active is not None:
            _active.learn_from(data)

    @hook_impl
    def before_dataset_saved(self, dataset_name: str, data: Any) -> None:
        if _active is not None:
            _active.learn_from(data)

    @hook_impl
    def after_pipeline_run(self) -> None:
        if _active is not None:
            _active.save_mapping()

    @hook_impl
    def on_pipeline_error(self) -> None:
        if _active is not None:
            _active.save_mapping()
