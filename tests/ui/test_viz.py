"""kedro-viz as a user meets it: `kedro viz build` and `kedro viz run` show every registered
pipeline and node, datasets sit in Kedro's layers, nodes are tagged by half (data / model /
predict), each model's nodes fold into its namespace, and the page really draws the DAG.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import pytest
from _browser import Page, assert_not_blank, copy_to_docs, free_port, serving
from _tiny_project import KEDRO, kedro, make_project, run_env

from neuroblastoma_cnn.pipeline_registry import MODELS, register_pipelines

pytestmark = pytest.mark.integration

LAYERS = {"raw", "intermediate", "primary", "feature", "model_input", "models", "model_output",
          "reporting"}
# kedro-viz keeps its settings in the browser's localStorage: this page sets them (no feature
# tour, light theme, no minimap or sidebar) on the served site's origin, then opens the flowchart.
PRESET_PAGE = """<!DOCTYPE html><html><body><script>
localStorage.setItem("KedroViz", JSON.stringify(
  {showFeatureHints: false, theme: "light", visible: {miniMap: false, sidebar: false}}));
location.replace("./" + location.search);
</script></body></html>
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project(tmp_path_factory.mktemp("viz") / "project", with_images=False)


@pytest.fixture(scope="module")
def build(project: Path) -> tuple[Path, str]:
    result = kedro(project, "viz", "build", timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return project / "build", output


def _read(build_dir: Path, *parts: str) -> dict[str, Any]:
    return json.loads(build_dir.joinpath("api", *parts).read_text())


def test_build_output_is_quiet(build: tuple[Path, str]):
    _, output = build
    bad = [line for line in output.splitlines() if re.search(r"WARNING|ERROR|Traceback", line)]
    assert not bad, "\n".join(bad)


def test_build_holds_every_registered_pipeline_and_node(build: tuple[Path, str]):
    build_dir, _ = build
    registered = register_pipelines()
    main = _read(build_dir, "main")
    assert {p["id"] for p in main["pipelines"]} == set(registered)
    assert main["selected_pipeline"] == "__default__"

    for name, pipeline in registered.items():
        graph = _read(build_dir, "pipelines", name)
        assert graph["selected_pipeline"] == name
        by_type: dict[str, set[str]] = {}
        for node in graph["nodes"]:
            by_type.setdefault(node["type"], set()).add(node.get("full_name") or node["name"])
        assert by_type.get("task") == {n.name for n in pipeline.nodes}, name
        datasets = {d for d in pipeline.datasets() if not d.startswith("params:")}
        datasets.discard("parameters")
        assert by_type.get("data") == datasets, name
        params = {d for d in pipeline.datasets() if d.startswith("params:")}
        assert by_type.get("parameters", set()) == params, name
        ids = {node["id"] for node in graph["nodes"]}
        assert graph["edges"], name
        assert all(e["source"] in ids and e["target"] in ids for e in graph["edges"]), name


def test_datasets_sit_in_layers_and_nodes_carry_their_half(build: tuple[Path, str]):
    build_dir, _ = build
    registered = register_pipelines()
    for name in registered:
        for node in _read(build_dir, "pipelines", name)["nodes"]:
            if node["type"] == "data":
                assert node.get("layer") in LAYERS, f"{node['name']} has no kedro-viz layer"
            if node["type"] == "task":
                half = {"data", "model", "predict"} & set(node["tags"])
                assert len(half) == 1, f"{node['full_name']} tags {node['tags']}"

    default = {n.name: n for n in registered["__default__"].nodes}
    data_nodes = {n.name for n in registered["data_processing"].nodes}
    for node_name, node in default.items():
        expected = "data" if node_name in data_nodes else "model"
        assert expected in node.tags, f"{node_name}: {sorted(node.tags)}"
    assert all("predict" in n.tags for n in registered["predict"].nodes)
    tags = {t["id"] for t in _read(build_dir, "main")["tags"]}
    assert {"data", "model"} <= tags


def test_each_model_folds_into_its_namespace(build: tuple[Path, str]):
    build_dir, _ = build
    main = _read(build_dir, "main")
    tree = main["modular_pipelines"]
    ids = {node["id"]: node for node in main["nodes"]}
    for model in MODELS:
        assert model in tree, sorted(tree)
        children = [ids[c["id"]] for c in tree[model]["children"] if c["id"] in ids]
        names = {c.get("full_name") or c["name"] for c in children if c["type"] == "task"}
        assert f"{model}.train_model" in names
        assert f"{model}.compute_test_metrics" in names
        assert {"id": model, "type": "modularPipeline"} in tree["__root__"]["children"]


def test_viz_run_serves_every_pipeline(project: Path, tmp_path: Path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [KEDRO, "viz", "run", "--no-browser", "--host", "127.0.0.1", "--port", str(port)]
    with (
        serving(command, f"{url}/api/main", project, tmp_path / "viz.log", env=run_env()),
        urlopen(f"{url}/api/main", timeout=30) as response,
    ):
        main = json.load(response)
    assert {p["id"] for p in main["pipelines"]} == set(register_pipelines())


def test_served_site_draws_the_dag(build: tuple[Path, str], tmp_path: Path):
    build_dir, _ = build
    site = tmp_path / "site"
    shutil.copytree(build_dir, site)
    (site / "preset.html").write_text(PRESET_PAGE)
    port = free_port()
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    registered = register_pipelines()
    data_half = {n.name for n in registered["data_processing"].nodes}
    with (
        serving(command, f"http://127.0.0.1:{port}/api/main", site, tmp_path / "http.log"),
        Page(tmp_path / "chromium") as page,
    ):
        page.open(f"http://127.0.0.1:{port}/preset.html?pid=train_resnet34",
                  ready=f"document.querySelectorAll('.pipeline-node--task').length >= "
                        f"{len(data_half)}")
        time.sleep(1)  # the layout animates into place once drawn
        dom = page.dom()
        png = page.screenshot(tmp_path / "kedro-viz.png")

    # The flowchart's SVG holds one element per drawn node; the namespace starts collapsed.
    drawn = re.findall(r'class="pipeline-node pipeline-node--(\w+)', dom)
    labels = set(re.findall(r'class="pipeline-node__text"[^>]*>([^<]+)<', dom))
    assert drawn.count("task") == len(data_half), drawn
    assert drawn.count("modularPipeline") == 1, drawn
    # The namespace's outputs no node inside it reads (test_metrics now feeds the model card).
    assert data_half | {"resnet34", "resnet34.model_card"} <= labels, sorted(labels)
    assert "resnet34.train_model" not in labels  # folded inside its namespace
    assert "resnet50" not in labels  # another pipeline
    assert png.size == (1400, 900)
    assert_not_blank(png)
    copy_to_docs(tmp_path / "kedro-viz.png", "kedro-viz.png")
