"""The notebooks as a user meets them: committed without outputs, and each runs top to bottom
against a trained project (the tiny environment, chosen through KEDRO_ENV as a user would).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat
import pytest
from _tiny_project import TrainedProject
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
NAMES = ("01_exploration", "02_results")
# What a notebook's outputs must never show (kernel noise, failures, library warnings).
NOISE = re.compile(r"WARNING|Traceback|Error|oneDNN|absl|Warning:")


def test_committed_notebooks_have_no_outputs():
    found = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    assert set(NAMES) <= set(found), found
    for name in found:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [], f"{name}: a cell has outputs (strip them)"
                assert cell.execution_count is None, f"{name}: a cell has an execution count"
        assert "widgets" not in nb.metadata, f"{name}: widget state saved"


def _texts(nb: nbformat.NotebookNode) -> list[str]:
    texts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                texts.append(output["text"])
            elif output.get("output_type") == "error":
                texts.append(f"{output['ename']}: {output['evalue']}")
            else:
                texts.append(output.get("data", {}).get("text/plain", ""))
    return texts


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(trained: TrainedProject, name: str,
                                     monkeypatch: pytest.MonkeyPatch):
    folder = trained.path / "notebooks"
    folder.mkdir(exist_ok=True)
    shutil.copy(NOTEBOOKS / f"{name}.ipynb", folder)
    nb = nbformat.read(folder / f"{name}.ipynb", as_version=4)
    monkeypatch.setenv("KEDRO_ENV", "tiny")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(folder)  # IPC sockets of the kernel live here, not in the repository
    kernel = KernelManager(kernel_name="python3", transport="ipc")
    NotebookClient(nb, km=kernel, timeout=600, resources={"metadata": {"path": str(folder)}},
                   ).execute()  # raises CellExecutionError on the first failing cell

    texts = _texts(nb)
    noisy = [t for t in texts if NOISE.search(re.sub(r"\x1b\[[0-9;]*m", "", t))]
    assert not noisy, "\n---\n".join(noisy)
    joined = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(texts))
    assert "environment tiny" in joined or "neuroblastoma_cnn_tiny" in joined
    if name == "01_exploration":
        assert "No file was rejected." in joined
        for label in ("Benign", "InSitu", "Invasive", "Normal"):
            assert label in joined
        figures = sum("image/png" in o.get("data", {}) for c in nb.cells
                      for o in c.get("outputs", []))
        assert figures >= 4  # sizes, tissue, sample tiles, augmentation
    else:
        assert "resnet34" in joined and "resnet50" in joined
        assert "macro-F1" in joined and "models:/m-" in joined
