"""`prune`: old versions go, every version an MLflow run still references stays, with what it
was made from; dry run unless --yes."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner

from neuroblastoma_cnn.cli.commands import main
from neuroblastoma_cnn.tracking import promotion, prune

V = [f"2026-0{m}-01T00.00.00.000Z" for m in range(1, 7)]  # oldest first


def _version(data: Path, artifact: str, version: str, size: int = 1000,
             made_from: dict[str, str] | None = None, status: str | None = None) -> Path:
    folder = data / artifact / version
    folder.mkdir(parents=True)
    (folder / Path(artifact).name).write_bytes(b"x" * size)
    if made_from is not None:
        (folder / "lineage.json").write_text(json.dumps({"made_from": made_from}))
    if status:
        promotion.write_status(folder, status)
    return folder


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Tiles V0..V4 (each from a data run), models V1 (failed), V3, V5, and MLflow runs:
    - FINISHED, trained model V3 on tiles V0 (tags name both);
    - FAILED, wrote model V1 (its tags name V1: a failed run keeps nothing);
    - deleted FINISHED run that read tiles V2;
    - RUNNING run writing tiles V4."""
    data = tmp_path / "data"
    for i in range(5):
        _version(data, "03_primary/tiles", V[i])
    _version(data, "06_models/resnet34/model.keras", V[1], 10_000, status="failed")
    _version(data, "06_models/resnet34/model.keras", V[3], 10_000, made_from={"tiles": V[0]},
             status="promoted")
    _version(data, "06_models/resnet34/model.keras", V[5], 10_000, status="promoted")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("e", artifact_location=str(tmp_path / "mlartifacts"))

    def run(status: str, tags: dict[str, str], delete: bool = False) -> None:
        created = client.create_run(experiment, tags=tags)
        if status != "RUNNING":
            client.set_terminated(created.info.run_id, status)
        if delete:
            client.delete_run(created.info.run_id)

    run("FINISHED", {"run_id": V[3], "data.resnet34.model": V[3]})
    run("FAILED", {"run_id": V[1], "data.resnet34.model": V[1], "data.tiles": V[0]})
    run("FINISHED", {"data.tiles": V[2]}, delete=True)
    run("RUNNING", {"run_id": V[4]})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return tmp_path


def _names(entries: list[prune.VersionFolder]) -> set[str]:
    return {f"{e.artifact.name}/{e.version}" for e in entries}


def test_plan_keeps_the_newest_and_what_runs_reference(project: Path):
    result = prune.plan(project / "data", keep=1,
                        tracking_uri=prune.default_tracking_uri(project))
    assert result.runs == 2  # the FINISHED and the RUNNING run; failed and deleted do not count
    assert result.failed_runs == {V[1]}  # what the failed run wrote never counts among the newest
    assert _names(result.delete) == {
        f"tiles/{V[1]}", f"tiles/{V[2]}",  # nobody's: V2's run was deleted
        f"model.keras/{V[1]}",  # failed model: never among the kept newest, run failed
    }
    assert f"tiles/{V[0]}" in _names(result.keep)  # model V3 was made from it
    assert f"tiles/{V[3]}" in _names(result.keep)  # V3 is the finished run's own version
    assert f"tiles/{V[4]}" in _names(result.keep)  # newest, and a running run writes it
    assert f"model.keras/{V[5]}" in _names(result.keep)  # newest
    assert 12_000 < result.bytes_freed < 12_500  # + the small promotion.json


def test_dry_run_by_default_then_yes_deletes(project: Path):
    runner = CliRunner()
    dry = runner.invoke(prune.prune, ["--keep", "1"])
    assert dry.exit_code == 0, dry.output
    assert f"Would delete data/03_primary/tiles/{V[1]}" in dry.output
    assert "3 version(s) to delete (0.0 MB), 5 kept; 2 MLflow run(s)" in dry.output
    assert "Run again with --yes to delete." in dry.output
    assert (project / "data/03_primary/tiles" / V[1]).is_dir()

    done = runner.invoke(prune.prune, ["--keep", "1", "--yes"])
    assert done.exit_code == 0, done.output
    left = sorted(p.name for p in (project / "data/03_primary/tiles").iterdir())
    assert left == [V[0], V[3], V[4]]
    assert sorted(p.name for p in (project / "data/06_models/resnet34/model.keras").iterdir()) \
        == [V[3], V[5]]
    again = runner.invoke(prune.prune, ["--keep", "1"])
    assert "0 version(s) to delete" in again.output


def test_keep_must_be_positive_and_hard_links_free_nothing(project: Path):
    with pytest.raises(ValueError, match="keep must be at least 1"):
        prune.plan(project / "data", keep=0)
    assert CliRunner().invoke(prune.prune, ["--keep", "0"]).exit_code == 2
    model = project / "data/06_models/resnet34/model.keras" / V[1] / "model.keras"
    (project / "linked.keras").hardlink_to(model)  # as MLflow's copy of a logged model
    result = prune.plan(project / "data", keep=1, tracking_uri=None)  # no run keeps anything
    assert _names(result.delete) == {*(f"tiles/{v}" for v in V[:4]), f"model.keras/{V[1]}",
                                     f"model.keras/{V[3]}"}
    # Model V1 is still MLflow's (hard link): only its promotion.json is freed.
    assert 14_000 < result.bytes_freed < 14_500


def test_prune_is_a_neuroblastoma_cnn_command(project: Path, capsys):
    assert main(["prune"]) == 0  # --keep 3: only the failed run's tiles and model go
    out = capsys.readouterr().out
    assert "2 version(s) to delete" in out
    assert f"Would delete data/03_primary/tiles/{V[1]}" in out
    assert main(["--help"]) == 0
    assert "prune" in capsys.readouterr().out
