"""The `demo` environment: the raw images are a public archive, fetched through the catalog.

The real archive (Kather 2016, Zenodo) is never downloaded here: a Kather-shaped zip made from
a few BACH images is served on loopback and the demo's URL and MD5 are pointed at it with
runtime parameters, exactly as `kedro run --env=demo --params demo.url=...,demo.md5=...` does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlflow.tracking._tracking_service.utils as tracking_utils
import pytest
import yaml
from _kather_like import ARCHIVE_NAME, SLIDE, TOP, make_kather_like, refused_url, serve, zip_folder
from _tiny_project import make_project
from conftest import PROJECT_ROOT, _require_bach
from kedro.framework.cli.utils import _split_params
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.io.core import DatasetError
from mlflow.tracking import fluent

from neuroblastoma_cnn.datasets.remote_archive import ArchiveError
from neuroblastoma_cnn.pipelines.ingestion.nodes import build_image_manifest

KATHER_URL = "https://zenodo.org/records/53169/files/Kather_texture_2016_image_tiles_5000.zip"
KATHER_MD5 = "0ddbebfc56344752028fda72602aaade"
N_SLIDES = 3


@pytest.fixture(scope="module")
def served_zip(tmp_path_factory: pytest.TempPathFactory):
    """(folder holding the zip, its MD5): 4 classes x 3 images, every slide in every class."""
    bach = _require_bach()
    work = tmp_path_factory.mktemp("kather_like")
    make_kather_like(work / "tree", bach, images_per_class=3, n_slides=N_SLIDES,
                     tiles_per_image=2)
    www = work / "www"
    www.mkdir()
    return www, zip_folder(work / "tree", www / ARCHIVE_NAME)


@pytest.fixture
def demo_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project copy without raw images, its own MLflow store, loopback without proxies."""
    project = make_project(tmp_path / "project", with_images=False)
    with (project / "conf" / "demo" / "mlflow.yml").open("a") as conf:
        conf.write(f"\nserver:\n  mlflow_tracking_uri: sqlite:///{project / 'mlflow.db'}\n")
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    _restore_mlflow_globals_after_test(monkeypatch)
    monkeypatch.chdir(project)
    return project


def _restore_mlflow_globals_after_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """kedro-mlflow points MLflow's process-wide tracking URI and active experiment (module
    globals and the MLFLOW_* variables it sets for subprocesses) at this project's store; later
    tests must not inherit an experiment id from a store that is gone."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    monkeypatch.setattr(fluent, "_active_experiment_id", fluent._active_experiment_id)


def cli_params(text: str) -> dict[str, Any]:
    """What `kedro run --params <text>` hands the session."""
    return _split_params(None, None, text)


def demo_context(project: Path, params: str | None = None):
    bootstrap_project(project)
    session = KedroSession.create(project_path=project, env="demo",
                                  runtime_params=cli_params(params) if params else None)
    return session, session.load_context()


def test_defaults_point_at_the_kather_archive(demo_project: Path) -> None:
    session, context = demo_context(demo_project)
    with session:
        assert context.params["demo"] == {"url": KATHER_URL, "md5": KATHER_MD5}
        described = context.catalog.get("raw_images")._describe()
    assert described["url"] == KATHER_URL
    assert described["md5"] == KATHER_MD5
    assert described["path"] == f"{demo_project.as_posix()}/data/01_raw/kather_2016"
    assert described["filepath"] == (
        f"{demo_project.as_posix()}/data/01_raw/Kather_texture_2016_image_tiles_5000.zip")


def test_params_override_the_url_and_md5_of_the_download(demo_project: Path) -> None:
    url = "http://127.0.0.1:9/mirror.zip"
    session, context = demo_context(demo_project, f"demo.url={url},demo.md5=md5:{'a' * 32}")
    with session:
        assert context.params["demo"] == {"url": url, "md5": f"md5:{'a' * 32}"}
        described = context.catalog.get("raw_images")._describe()
    assert (described["url"], described["md5"]) == (url, f"md5:{'a' * 32}")


def test_demo_catalog_downloads_once_and_ingestion_finds_the_slides(
    demo_project: Path, served_zip
) -> None:
    www, md5 = served_zip
    with serve(www) as server:
        params = f"demo.url={server.url}/{ARCHIVE_NAME},demo.md5={md5}"
        session, context = demo_context(demo_project, params)
        with session:
            root = context.catalog.load("raw_images")
            ingestion = context.params["ingestion"]
        assert server.requests == [f"/{ARCHIVE_NAME}"]
        session, context = demo_context(demo_project, params)
        with session:
            assert context.catalog.load("raw_images") == root
        assert server.requests == [f"/{ARCHIVE_NAME}"]  # the second session did not download

    assert root == demo_project / "data" / "01_raw" / "kather_2016" / TOP
    readme = (root.parent / "README.md").read_text()
    assert "CC BY 4.0" in readme and "10.1038/srep27988" in readme
    manifest, rejected = build_image_manifest(root, ingestion)
    assert rejected.empty, rejected
    assert sorted(manifest["group"].unique()) == [SLIDE.format(i + 1) for i in range(N_SLIDES)]
    # every slide holds tiles of several classes, as Kather's do
    assert (manifest.groupby("group")["label"].nunique() > 1).all()


def test_offline_demo_says_where_to_put_the_zip(demo_project: Path) -> None:
    url = refused_url()
    session, context = demo_context(demo_project, f"demo.url={url}")
    with session, pytest.raises(DatasetError) as caught:
        context.catalog.load("raw_images")
    # Kedro's catalog re-wraps it, prefixed with the dataset name; the cause is the project's
    assert isinstance(caught.value.__cause__, ArchiveError)
    message = caught.value.__cause__.one_line()
    assert str(caught.value) == f"raw_images: {message}"
    target = demo_project / "data" / "01_raw" / ARCHIVE_NAME
    assert f"Cannot download '{url}'" in message
    assert f"place it at '{target}' (MD5 {KATHER_MD5})" in message
    assert "--params demo.url=<url>,demo.md5=md5:<hash>" in message
    assert not (demo_project / "data" / "01_raw" / "kather_2016").exists()


def test_demo_environment_only_restates_what_it_changes() -> None:
    """The demo overrides keys of existing blocks; a typo would add a silently ignored key."""
    base: dict[str, Any] = {}
    for path in sorted((PROJECT_ROOT / "conf" / "base").glob("parameters*.yml")):
        base.update(yaml.safe_load(path.read_text()))
    demo = yaml.safe_load((PROJECT_ROOT / "conf" / "demo" / "parameters.yml").read_text())

    def unknown(over: dict[str, Any], under: dict[str, Any], prefix: str = "") -> list[str]:
        out = []
        for key, value in over.items():
            if key not in under:
                out.append(prefix + key)
            elif isinstance(value, dict) and isinstance(under[key], dict):
                out += unknown(value, under[key], f"{prefix}{key}.")
        return out

    assert unknown({k: v for k, v in demo.items() if k != "demo"}, base) == []
