"""The team's tracking server with logins: ``mlflow server --app-name basic-auth`` on
127.0.0.1 with ``conf/team/basic_auth.ini``, artifacts proxied to an S3 API (moto's server on
loopback). As README "Working as a team" says: the admin creates two users and gives one of
them the experiment; that user's ``kedro run`` (``conf/team``'s tracking settings, credentials
from the environment only) logs, registers and serves through the server; an anonymous client
gets 401 and the other user 403 on the runs and their artifacts; wrong credentials or no server
stop ``kedro run`` in one line naming the server (never the password) before anything runs."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import pytest
import yaml
from _browser import free_port, serving
from _tiny_project import KEDRO, run_env

from neuroblastoma_cnn.hooks.preflight import shown_uri

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_DEFAULT_REGION": "us-east-1"}
ADMIN, ALICE = ("admin", "admin-Secret-1"), ("alice", "alice-Secret-1")
BOB = ("bob", "bob-Secret-12")  # MLflow asks for 12 characters or more


def _get(url: str, user: tuple[str, str] | None) -> int:
    request = urllib.request.Request(url)
    if user:
        token = base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _team_tiny(project: Path) -> None:
    """conf/team_tiny: the tiny sizes with conf/team's tracking settings on top."""
    target = project / "conf" / "team_tiny"
    shutil.copytree(project / "conf" / "tiny", target)
    tracking = yaml.safe_load((project / "conf" / "team" / "mlflow.yml").read_text())
    tracking["tracking"]["experiment"]["name"] = "neuroblastoma_cnn_team"
    (target / "mlflow.yml").write_text(yaml.safe_dump(tracking))


def _kedro(project: Path, uri: str, user: tuple[str, str] | None, *args: str
           ) -> subprocess.CompletedProcess[str]:
    env = run_env(MLFLOW_TRACKING_URI=uri, **AWS)
    if user:
        env.update(MLFLOW_TRACKING_USERNAME=user[0], MLFLOW_TRACKING_PASSWORD=user[1])
    return subprocess.run([KEDRO, "run", "--env=team_tiny", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=900, check=False)


def test_a_team_server_with_logins(trained_copy, tmp_path):
    server = tmp_path / "server"
    server.mkdir()
    shutil.copy(ROOT / "conf" / "team" / "basic_auth.ini", server / "basic_auth.ini")
    _team_tiny(trained_copy)
    s3_port, port = free_port(), free_port()
    s3 = f"http://127.0.0.1:{s3_port}"
    uri = f"http://127.0.0.1:{port}"
    with serving([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
                 f"{s3}/moto-api/", server, tmp_path / "moto.log", env=run_env(**AWS)):
        boto3.client("s3", endpoint_url=s3, **{k.lower(): v for k, v in AWS.items()
                                               if k != "AWS_DEFAULT_REGION"},
                     region_name="us-east-1").create_bucket(Bucket="team-artifacts")
        command = [str(BIN / "mlflow"), "server", "--app-name", "basic-auth",
                   "--backend-store-uri", f"sqlite:///{server / 'mlflow.db'}",
                   "--artifacts-destination", "s3://team-artifacts/mlartifacts",
                   "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port),
                   "--workers", "1"]
        env = run_env(MLFLOW_AUTH_CONFIG_PATH=str(server / "basic_auth.ini"),
                      MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN[1], MLFLOW_S3_ENDPOINT_URL=s3,
                      MLFLOW_FLASK_SERVER_SECRET_KEY="team-test-csrf-key",
                      MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **AWS)
        with serving(command, f"{uri}/health", server, tmp_path / "mlflow.log", env=env,
                     timeout=240):
            _check_team_server(trained_copy, uri, s3, tmp_path)


def _users(uri: str) -> str:
    """As the admin: alice and bob, and the experiment given to alice; returns its id."""
    import mlflow  # noqa: PLC0415
    from mlflow.server import get_app_client  # noqa: PLC0415

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
        patch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
        auth = get_app_client("basic-auth", tracking_uri=uri)
        auth.create_user(*ALICE)
        auth.create_user(*BOB)
        experiment = mlflow.MlflowClient(uri).create_experiment("neuroblastoma_cnn_team")
        auth.grant_user_permission(ALICE[0], "experiment", experiment, "MANAGE")
    return experiment


def _check_team_server(project: Path, uri: str, s3: str, tmp_path: Path) -> None:
    import mlflow  # noqa: PLC0415

    experiment = _users(uri)  # README "Working as a team", step 2

    # Before any training: wrong credentials, and no server, in one line without the password.
    wrong = _kedro(project, uri, (ALICE[0], "not-her-password"), "--pipeline=resnet34")
    assert wrong.returncode != 0
    line = f"The MLflow tracking server {uri} refused user 'alice': HTTP 401"
    assert line in wrong.stdout + wrong.stderr, wrong.stdout[-2000:] + wrong.stderr[-2000:]
    assert "not-her-password" not in wrong.stdout + wrong.stderr
    assert "Traceback" not in wrong.stdout + wrong.stderr
    gone = f"http://alice:{ALICE[1]}@127.0.0.1:{free_port()}"
    unreachable = _kedro(project, gone, None, "--pipeline=resnet34")
    assert f"The MLflow tracking server {shown_uri(gone)} is unreachable" in \
        unreachable.stdout + unreachable.stderr, unreachable.stderr[-2000:]
    assert ALICE[1] not in unreachable.stdout + unreachable.stderr

    # Alice's run logs, promotes and registers through the server; artifacts land in S3.
    local = set((project / "mlartifacts").rglob("*"))
    result = _kedro(project, uri, ALICE, "--pipeline=resnet34")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert set((project / "mlartifacts").rglob("*")) == local  # nothing logged locally
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", ALICE[0])
        patch.setenv("MLFLOW_TRACKING_PASSWORD", ALICE[1])
        client = mlflow.MlflowClient(uri)
        (run,) = client.search_runs([experiment])
        versions = client.search_model_versions()
    assert run.info.status == "FINISHED" and versions, run.data.tags
    keys = [o["Key"] for o in boto3.client(
        "s3", endpoint_url=s3, aws_access_key_id="testing", aws_secret_access_key="testing",
        region_name="us-east-1").list_objects_v2(Bucket="team-artifacts").get("Contents", [])]
    assert any(k.endswith(".keras") for k in keys), keys

    # Nobody else reads them: anonymous 401, bob (no permission) 403; alice 200.
    run_url = f"{uri}/api/2.0/mlflow/runs/get?run_id={run.info.run_id}"
    list_url = f"{uri}/api/2.0/mlflow/artifacts/list?run_id={run.info.run_id}"
    artifact = next(k for k in keys if k.endswith(".keras")).split("mlartifacts/", 1)[1]
    file_url = f"{uri}/api/2.0/mlflow-artifacts/artifacts/{artifact}"
    assert [_get(u, None) for u in (run_url, list_url, file_url)] == [401] * 3
    assert [_get(u, BOB) for u in (run_url, list_url, file_url)] == [403] * 3
    assert [_get(u, ALICE) for u in (run_url, list_url, file_url)] == [200] * 3

    # Served through the server: alice's credentials fetch the registered model.
    version = sorted(versions, key=lambda v: int(v.version))[-1]
    serve_port = free_port()
    command = [str(BIN / "mlflow"), "models", "serve", "-m",
               f"models:/{version.name}/{version.version}", "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(serve_port), "-w", "1"]
    env = run_env(MLFLOW_TRACKING_URI=uri, MLFLOW_TRACKING_USERNAME=ALICE[0],
                  MLFLOW_TRACKING_PASSWORD=ALICE[1], TF_CPP_MIN_LOG_LEVEL="3",
                  PATH=f"{BIN}:{run_env().get('PATH', '')}")
    image = next((project / "data" / "01_raw" / "images").rglob("*.png"))
    with serving(command, f"http://127.0.0.1:{serve_port}/ping", tmp_path,
                 tmp_path / "serve.log", env=env, timeout=300):
        body = json.dumps({"dataframe_split": {"columns": ["file", "image"], "data": [
            [image.name, base64.b64encode(image.read_bytes()).decode()]]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{serve_port}/invocations", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.loads(response.read())["predictions"][0]
    assert answer["error"] == "" and answer["n_tiles"] >= 1, answer
