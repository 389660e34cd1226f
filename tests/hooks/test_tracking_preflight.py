"""A tracking server that is unreachable or refuses the credentials stops a run in one line
naming the server without its password, before kedro-mlflow contacts it."""

from __future__ import annotations

import http.server
import threading

import pytest

from neuroblastoma_cnn.core.errors import ProjectError
from neuroblastoma_cnn.hooks.preflight import check_tracking_server, shown_uri


class _Refusing(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.seen.append(self.headers.get("Authorization"))
        self.send_response(401 if self.headers.get("Authorization") != self.good else 200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server():
    _Refusing.seen, _Refusing.good = [], "Basic YWxpY2U6cmlnaHQ="  # alice:right
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_the_password_is_never_shown():
    assert shown_uri("http://alice:s3cret@host:5000/x") == "http://alice@host:5000/x"
    assert shown_uri("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


def test_refused_credentials_are_one_line(server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    with pytest.raises(ProjectError) as caught:
        check_tracking_server(server)
    line = caught.value.one_line()
    assert line.startswith(f"The MLflow tracking server {server} refused user 'alice': HTTP 401")
    assert "MLFLOW_TRACKING_PASSWORD" in line and "wrong" not in line
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "right")
    check_tracking_server(server)  # accepted
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    with pytest.raises(ProjectError, match="refused no user"):
        check_tracking_server(server)
    check_tracking_server(server.replace("http://", "http://alice:right@"))  # in the URI


def test_an_unreachable_server_is_one_line_without_its_password():
    with pytest.raises(ProjectError) as caught:
        check_tracking_server("http://alice:s3cret@127.0.0.1:9", timeout=2)
    line = caught.value.one_line()
    assert line.startswith("The MLflow tracking server http://alice@127.0.0.1:9 is unreachable")
    assert "s3cret" not in line
    check_tracking_server("sqlite:///mlflow.db")  # not a server: nothing to check
