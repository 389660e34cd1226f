"""Optuna's RDB storage for studies: opened with retries, URLs redacted in messages, stale
trials failed and re-queued.

Kept apart from ``engine.py``: the database concerns (SQLite vs a server, schema races between
workers, heartbeats) are independent of how trials run; see the ``engine`` docstring for why RDB.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError

from neuroblastoma_cnn.core.errors import DataError

from . import child_runs
from .plan import StudyPlan
from .studies import ATTR_RUN, describe_point, make_pruner, make_sampler

#: Logged under the engine's name: one logger for the trials engine's lines.
logger = logging.getLogger("neuroblastoma_cnn.trials.engine")


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite:")


def _redacted(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.rsplit("@", maxsplit=1)[-1] if "@" in url else url


#: Tries to open a storage whose tables another worker is creating at the same moment.
SCHEMA_RACE_ATTEMPTS = 5


def _schema_race(exc: Exception) -> bool:
    """Whether ``exc`` is what losing a race to create the storage's tables looks like."""
    text = str(exc).lower()
    return isinstance(exc, IntegrityError) or "already exists" in text or "locked" in text


def _rdb_storage(url: str, engine_kwargs: dict[str, Any], heartbeat_seconds: int,
                 stale_trial_callback: StaleTrialCallback) -> optuna.storages.RDBStorage:
    """Optuna's storage at ``url``. Workers opening a new storage together all create its
    tables and the losers fail (UNIQUE constraint, table exists, database locked): they try
    again, when the tables exist."""
    attempt = 1
    while True:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_seconds,
                    heartbeat_stale_trial_callback=stale_trial_callback)
        except (IntegrityError, OperationalError) as exc:
            if attempt == SCHEMA_RACE_ATTEMPTS or not _schema_race(exc):
                raise
            time.sleep(0.2 * attempt)
            attempt += 1


def open_storage(url: str, heartbeat_seconds: int, max_retries: int = 2,
                 tracking_uri: str | None = None) -> optuna.storages.RDBStorage:
    """The study storage at ``url``, with heartbeats and stale-trial retries.

    Raises DataError naming the (password-free) URL when it cannot be opened: a wrong URL,
    a missing driver, a server that does not answer, a folder that cannot be created.
    """
    engine_kwargs: dict[str, Any]
    if _is_sqlite(url):
        path = url.split(":///", 1)[-1] if ":///" in url else ""
        if path and path != ":memory:":
            try:
                Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DataError(f"Cannot create the folder of study storage '{url}': {exc}.",
                                hint="set study.storage to a writable path") from None
        engine_kwargs = {"connect_args": {"timeout": 60}}
    elif url.startswith(("postgresql", "mysql")):
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    try:
        return _rdb_storage(url, engine_kwargs, heartbeat_seconds,
                            StaleTrialCallback(max_retries, tracking_uri))
    except Exception as exc:  # SQLAlchemy, driver import and URL errors all mean 'unusable'
        reason = " ".join(str(exc).split())[:300]
        raise DataError(
            f"Cannot open the study storage '{_redacted(url)}': {type(exc).__name__}: {reason}",
            hint="study.storage must be a reachable database URL, e.g. sqlite:///data/optuna.db "
                 "or postgresql://user:password@host/db",
        ) from None


class StaleTrialCallback:
    """Runs when a trial's heartbeat went stale (its worker died): ends the trial's MLflow run
    as KILLED, then queues the same (variant, repeat) again, at most ``max_retries`` times."""

    def __init__(self, max_retries: int, tracking_uri: str | None):
        self.max_retries = max_retries
        self.tracking_uri = tracking_uri

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        logger.warning("Trial %d %s: its worker stopped (no heartbeat); it will run again.",
                       trial.number, describe_point(trial))
        run_id = trial.user_attrs.get(ATTR_RUN)
        if run_id and self.tracking_uri:
            child_runs.close_run(self.tracking_uri, run_id, "KILLED",
                               {"study.counted": "false", "study.reason": "worker stopped"})
        optuna.storages.RetryFailedTrialCallback(max_retry=self.max_retries)(study, trial)


def load_existing(plan: StudyPlan, study_name: str) -> optuna.Study:
    """The study from its storage, for reading only (summary)."""
    storage = open_storage(plan.storage, plan.heartbeat_seconds, plan.max_retries)
    try:
        return optuna.load_study(study_name=study_name, storage=storage,
                                 sampler=make_sampler(plan), pruner=make_pruner(plan))
    except KeyError:
        raise DataError(f"The storage holds no study '{study_name}'.",
                        hint="run the study with study.workers >= 1 first") from None
