"""In a notebook, loading the project with Kedro's IPython extension makes the project's own
errors print as one line, while a bug keeps IPython's traceback.

The shell runs in a subprocess: `%reload_kedro` purges and re-imports the package, which would
leave this test process with two copies of every project class.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _tiny_project import make_project, run_env

pytestmark = pytest.mark.integration

CELLS = textwrap.dedent("""
    import sys
    from IPython.core.interactiveshell import InteractiveShell

    def mark(text):
        for stream in (sys.stdout, sys.stderr):
            print(text, file=stream, flush=True)

    shell = InteractiveShell.instance()
    assert shell.run_cell("%load_ext kedro.ipython").success
    mark("=== reload")
    assert not shell.run_cell("%reload_kedro --env=tinyy").success
    mark("=== bug")
    assert not shell.run_cell("1 / 0").success
""")


def _part(text: str, start: str, end: str | None = None) -> str:
    text = text.split(start, 1)[1]
    return text.split(end, 1)[0] if end else text


def test_reload_kedro_with_a_mistyped_environment_prints_one_line(tmp_path: Path):
    project = make_project(tmp_path / "project", with_images=False)
    result = subprocess.run([sys.executable, "-c", CELLS], cwd=project, env=run_env(),
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    reload_part = (_part(result.stdout, "=== reload", "=== bug")
                   + _part(result.stderr, "=== reload", "=== bug"))
    bug_part = _part(result.stdout, "=== bug") + _part(result.stderr, "=== bug")
    errors = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, output[-3000:]
    assert errors[0] in reload_part
    assert errors[0].startswith("Error: Environment 'tinyy' does not exist: there is no folder "
                                "'conf/tinyy'. Environments: ")
    assert "Traceback" not in reload_part and "ProjectError" not in reload_part
    assert "ZeroDivisionError" in bug_part and "Traceback" in bug_part
