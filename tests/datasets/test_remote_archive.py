"""RemoteArchiveDataset: download once, verify, unpack whole, reuse offline, fail clearly.

The archive is a Kather-shaped zip made from a few real BACH images, served on loopback: no
test reaches the internet.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from _kather_like import ARCHIVE_NAME, TOP, make_kather_like, refused_url, serve, zip_folder
from conftest import _require_bach
from kedro.io.core import DatasetError

from neuroblastoma_cnn.core.errors import DataError, ParameterError
from neuroblastoma_cnn.datasets import RemoteArchiveDataset
from neuroblastoma_cnn.datasets.remote_archive import (
    MARKER,
    ArchiveError,
    ArchiveParameterError,
)

ATTRIBUTION = "Test tiles cut from BACH (CC BY-NC-ND 4.0)."


@pytest.fixture(scope="module")
def served_zip(tmp_path_factory: pytest.TempPathFactory):
    """(folder holding the zip, its MD5, number of tiles in it)."""
    bach = _require_bach()
    work = tmp_path_factory.mktemp("kather_like")
    make_kather_like(work / "tree", bach, images_per_class=2, n_slides=2, tiles_per_image=2)
    www = work / "www"
    www.mkdir()
    md5 = zip_folder(work / "tree", www / ARCHIVE_NAME)
    n_tiles = len(list((work / "tree").rglob("*.tif")))
    return www, md5, n_tiles


@pytest.fixture(autouse=True)
def _loopback_without_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def dataset(raw: Path, url: str, md5: str, **kwargs) -> RemoteArchiveDataset:
    return RemoteArchiveDataset(
        url=url, md5=md5, filepath=str(raw / ARCHIVE_NAME), path=str(raw / "kather_2016"),
        image_root=TOP, attribution=ATTRIBUTION, **kwargs,
    )


def test_first_load_downloads_verifies_and_unpacks(served_zip, tmp_path: Path) -> None:
    www, md5, n_tiles = served_zip
    raw = tmp_path / "01_raw"
    with serve(www) as server:
        ds = dataset(raw, f"{server.url}/{ARCHIVE_NAME}", md5)
        assert not ds.exists()  # asking never downloads
        assert server.requests == []
        root = ds.load()
    assert server.requests == [f"/{ARCHIVE_NAME}"]
    assert root == raw / "kather_2016" / TOP
    assert sorted(p.name for p in root.iterdir()) == [
        "01_BENIGN", "02_INSITU", "03_INVASIVE", "04_NORMAL"]
    assert len(list(root.rglob("*.tif"))) == n_tiles
    assert hashlib.md5((raw / ARCHIVE_NAME).read_bytes()).hexdigest() == md5
    assert json.loads((raw / "kather_2016" / MARKER).read_text())["md5"] == md5
    assert (raw / "kather_2016" / "README.md").read_text().strip() == ATTRIBUTION
    # only the zip and the unpacked folder: no temporary file or folder left beside them
    assert sorted(p.name for p in raw.iterdir()) == [ARCHIVE_NAME, "kather_2016"]
    assert ds.exists()


def test_second_load_uses_the_verified_copy_without_network(served_zip, tmp_path: Path) -> None:
    www, md5, _ = served_zip
    raw = tmp_path / "01_raw"
    with serve(www) as server:
        first = dataset(raw, f"{server.url}/{ARCHIVE_NAME}", md5).load()
        assert len(server.requests) == 1
        again = dataset(raw, f"{server.url}/{ARCHIVE_NAME}", f"md5:{md5.upper()}").load()
        assert server.requests == [f"/{ARCHIVE_NAME}"]  # no second request
    assert again == first
    # and with the server gone (offline), too
    assert dataset(raw, refused_url(), md5).load() == first


def test_wrong_md5_is_refused_and_leaves_nothing(served_zip, tmp_path: Path) -> None:
    www, md5, _ = served_zip
    raw = tmp_path / "01_raw"
    wrong = "0" * 32
    with serve(www) as server, pytest.raises(ArchiveError) as caught:
        dataset(raw, f"{server.url}/{ARCHIVE_NAME}", wrong).load()
    message = str(caught.value)
    assert f"has MD5 {md5}, not the expected {wrong}" in message
    assert "nothing was unpacked" in message
    assert isinstance(caught.value, DataError) and isinstance(caught.value, DatasetError)
    assert list(raw.iterdir()) == []  # no zip, no temporary download, no folder


def test_connection_refused_names_the_url_and_where_to_put_the_zip(tmp_path: Path) -> None:
    raw = tmp_path / "01_raw"
    url = refused_url()
    with pytest.raises(ArchiveError) as caught:
        dataset(raw, url, "0ddbebfc56344752028fda72602aaade").load()
    message = caught.value.one_line()
    assert f"Cannot download '{url}' (connection refused)" in message
    assert f"place it at '{(raw / ARCHIVE_NAME).resolve()}'" in message
    assert "MD5 0ddbebfc56344752028fda72602aaade" in message
    assert "\n" not in message
    assert not (raw / "kather_2016").exists()


def test_http_error_is_reported_with_its_status(served_zip, tmp_path: Path) -> None:
    www, md5, _ = served_zip
    with serve(www) as server, pytest.raises(ArchiveError, match=r"\(HTTP 404 File not found\)"):
        dataset(tmp_path / "raw", f"{server.url}/missing.zip", md5).load()


def test_zip_placed_by_hand_is_used_without_network(served_zip, tmp_path: Path) -> None:
    www, md5, n_tiles = served_zip
    raw = tmp_path / "01_raw"
    raw.mkdir()
    (raw / ARCHIVE_NAME).write_bytes((www / ARCHIVE_NAME).read_bytes())
    root = dataset(raw, refused_url(), md5).load()
    assert len(list(root.rglob("*.tif"))) == n_tiles


def test_interrupted_unpack_leaves_no_folder_a_later_run_would_trust(
    served_zip, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    www, md5, n_tiles = served_zip
    raw = tmp_path / "01_raw"
    raw.mkdir()
    (raw / ARCHIVE_NAME).write_bytes((www / ARCHIVE_NAME).read_bytes())
    real_extract = zipfile.ZipFile.extractall

    def extract_then_stop(self, path=None, *args, **kwargs):
        self.extract(self.namelist()[-1], path)  # part of the files, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(zipfile.ZipFile, "extractall", extract_then_stop)
    with pytest.raises(KeyboardInterrupt):
        dataset(raw, refused_url(), md5).load()
    assert sorted(p.name for p in raw.iterdir()) == [ARCHIVE_NAME]  # no partial folder

    monkeypatch.setattr(zipfile.ZipFile, "extractall", real_extract)
    root = dataset(raw, refused_url(), md5).load()
    assert len(list(root.rglob("*.tif"))) == n_tiles


def test_unverified_folder_and_killed_unpack_leftovers_are_replaced(
    served_zip, tmp_path: Path
) -> None:
    www, md5, n_tiles = served_zip
    raw = tmp_path / "01_raw"
    (raw / "kather_2016" / TOP / "01_BENIGN").mkdir(parents=True)  # half a folder, no marker
    (raw / "kather_2016" / TOP / "01_BENIGN" / "stray.tif").write_bytes(b"partial")
    (raw / ".kather_2016.unpacking-abc").mkdir()  # left by a killed process
    (raw / ARCHIVE_NAME).write_bytes((www / ARCHIVE_NAME).read_bytes())
    ds = dataset(raw, refused_url(), md5)
    assert not ds.exists()
    root = ds.load()
    assert not (root / "01_BENIGN" / "stray.tif").exists()
    assert len(list(root.rglob("*.tif"))) == n_tiles
    assert sorted(p.name for p in raw.iterdir()) == [ARCHIVE_NAME, "kather_2016"]


def test_archive_without_the_image_root_is_refused(served_zip, tmp_path: Path) -> None:
    www, md5, _ = served_zip
    raw = tmp_path / "01_raw"
    raw.mkdir()
    (raw / ARCHIVE_NAME).write_bytes((www / ARCHIVE_NAME).read_bytes())
    ds = RemoteArchiveDataset(url=refused_url(), md5=md5, filepath=str(raw / ARCHIVE_NAME),
                              path=str(raw / "kather_2016"), image_root="images")
    with pytest.raises(ArchiveError, match=rf"has no folder 'images' \(it holds \['{TOP}'\]\)"):
        ds.load()
    assert sorted(p.name for p in raw.iterdir()) == [ARCHIVE_NAME]


@pytest.mark.parametrize("md5", ["abc", 12345, "md5:" + "g" * 32])
def test_malformed_md5_is_a_parameter_error(md5, tmp_path: Path) -> None:
    ds = dataset(tmp_path, refused_url(), md5)
    with pytest.raises(ArchiveParameterError) as caught:
        ds.load()
    assert isinstance(caught.value, ParameterError)
    assert not ds.exists()
    assert list(tmp_path.iterdir()) == []


def test_raw_data_is_read_only(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="read-only"):
        dataset(tmp_path, refused_url(), "0" * 32).save(tmp_path)


def test_entry_naming_a_missing_folder_of_a_verified_copy_leaves_the_copy_alone(
    served_zip, tmp_path: Path
) -> None:
    www, md5, n_tiles = served_zip
    raw = tmp_path / "01_raw"
    raw.mkdir()
    (raw / ARCHIVE_NAME).write_bytes((www / ARCHIVE_NAME).read_bytes())
    root = dataset(raw, refused_url(), md5).load()
    marker = (raw / "kather_2016" / MARKER).stat().st_mtime_ns
    other = RemoteArchiveDataset(url=refused_url(), md5=md5, filepath=str(raw / ARCHIVE_NAME),
                                 path=str(raw / "kather_2016"), image_root=f"{TOP}/01_TUMOR")
    assert not other.exists()
    with pytest.raises(ArchiveError, match=rf"has no folder '{TOP}/01_TUMOR'"):
        other.load()
    assert (raw / "kather_2016" / MARKER).stat().st_mtime_ns == marker  # not unpacked again
    assert len(list(root.rglob("*.tif"))) == n_tiles
