"""In a notebook, loading the project with Kedro's IPython extension makes the project's own
errors print as one line, while a bug keeps IPython's traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from _tiny_project import make_project
from IPython.core.interactiveshell import InteractiveShell

pytestmark = pytest.mark.integration


def test_reload_kedro_with_a_mistyped_environment_prints_one_line(tmp_path: Path, monkeypatch,
                                                                  capsys):
    project = make_project(tmp_path / "project", with_images=False)
    monkeypatch.chdir(project)
    monkeypatch.delenv("KEDRO_ENV", raising=False)
    shell = InteractiveShell.instance()
    try:
        assert shell.run_cell("%load_ext kedro.ipython").success
        capsys.readouterr()
        assert not shell.run_cell("%reload_kedro --env=tinyy").success
        out = capsys.readouterr()
        errors = [line for line in (out.out + out.err).splitlines() if "tinyy" in line]
        assert len(errors) == 1, out
        assert errors[0].startswith("Error: Environment 'tinyy' does not exist: there is no "
                                    "folder 'conf/tinyy'. Environments: ")
        assert "Traceback" not in out.out + out.err

        assert not shell.run_cell("1 / 0").success
        out = capsys.readouterr()
        assert "ZeroDivisionError" in out.out + out.err
        assert "Traceback" in out.out + out.err
    finally:
        InteractiveShell.clear_instance()
