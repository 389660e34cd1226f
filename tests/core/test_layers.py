"""The layers depend downward only, and nothing imports itself back.

- every sub-package (and root module) of ``src/neuroblastoma_cnn`` sits in one layer of
  :data:`LAYERS`, and every import points to a lower layer or stays in its own package;
- packages of one layer do not import each other, and pipelines never import each other;
- no import cycle, between modules or between packages (package A's modules import package B's
  and B's import A's: a cycle the module graph need not show);
- the package root holds the Kedro entry points and sub-packages, few modules.

Checked on the source (imports parsed with ast), so an import hidden inside a function counts
too. ``importlib.import_module`` with a string is not seen: ``models/families.py`` uses it only
for modules of its own package.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "neuroblastoma_cnn"
PIPELINES = PACKAGE / "pipelines"
ROOT = PACKAGE.name
#: The layers, lowest first (docs/architecture.md says what each holds and why it sits there).
#: A module may import its own package and the packages of lower layers only.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("core",),                  # errors, value types, storage paths, grouped folds
    ("images", "runtime"),      # image file -> tiles, the preprocessing record; devices, pools
    ("params",),                # the typed parameter groups (IngestionParams is a TilingConfig)
    ("tracking",),              # lineage, promotion status, privacy, the MLflow Model Registry
    ("models",),                # the model families' table and builders
    ("datasets",),              # Kedro datasets: tile stores, .keras files, heads, MLflow
    ("analysis",),              # what a model's outputs mean: metrics, calibration, Grad-CAM
    ("serving",),               # image files -> answers: predict_files and the raw-image pyfunc
    ("trials",),                # the Optuna trials engine that studies and folds run on
    ("pipelines",),             # one package per stage; none imports another
    ("hooks", "cli", "pipeline_registry"),  # wire and run the pipelines
    ("settings", "__main__", ROOT),          # Kedro's entry points, the package itself
)
#: Below the pipelines: nothing here may import a pipeline or what wires and runs them.
SHARED = tuple(name for layer in LAYERS[:LAYERS.index(("pipelines",))] for name in layer)
#: Above the pipelines: they wire them (registry, settings, hooks) or run them (cli, __main__).
ABOVE_PIPELINES = ("pipeline_registry", "settings", "hooks", "cli", "__main__")
#: The most modules the package root may hold besides its sub-packages.
MAX_ROOT_MODULES = 8


def module_name(path: Path) -> str:
    """``.../neuroblastoma_cnn/images/stain.py`` -> ``neuroblastoma_cnn.images.stain`` (a
    package's ``__init__.py`` is the package)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module a file imports (relative imports resolved)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def source_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports: ``from a import b`` is an edge to ``a.b`` when
    that is a module, else to ``a``; ``import a.b.c`` an edge to ``a.b.c``."""
    modules = source_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for imported in imported_modules(path):
            # The nearest existing module: `a.b.SomeClass` -> `a.b`.
            target = imported
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    # `from a import b` where b is a module also records `a` (the package, via `base`): keep
    # only the module edge, or every sub-package would seem to import its own __init__ back.
    for name, edges in graph.items():
        graph[name] = {e for e in edges
                       if not any(o.startswith(e + ".") for o in edges)}
    return graph


def package_of(module: str) -> str:
    """``neuroblastoma_cnn.images.stain`` -> ``images``; a root module is its own package
    (``settings``); the package itself is ``neuroblastoma_cnn``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Package -> the other packages its modules import. Importing the package itself
    (``import neuroblastoma_cnn``) is left out: every import of a sub-module runs it first."""
    packages: dict[str, set[str]] = {}
    for module, edges in graph.items():
        own = package_of(module)
        packages.setdefault(own, set()).update(
            package_of(e) for e in edges if package_of(e) not in (own, ROOT))
    return packages


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def layer_of(package: str, layers: tuple[tuple[str, ...], ...] = LAYERS) -> int | None:
    return next((i for i, layer in enumerate(layers) if package in layer), None)


def imports_against_the_layers(graph: dict[str, set[str]],
                               layers: tuple[tuple[str, ...], ...] = LAYERS) -> list[str]:
    """Every import to a package of the same or a higher layer (its own package aside)."""
    found = []
    for module, edges in sorted(graph.items()):
        own = package_of(module)
        for target in sorted(edges):
            other = package_of(target)
            if other in (own, ROOT):
                continue
            mine, theirs = layer_of(own, layers), layer_of(other, layers)
            if mine is None or theirs is None or theirs >= mine:
                found.append(f"{module} ({own}) imports {target} ({other})")
    return found


def pipeline_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] == [ROOT, "pipelines"] and len(parts) > 2:
        return parts[2]
    return None


def is_above_pipelines(module: str) -> bool:
    return any(module == f"{ROOT}.{name}"
               or module.startswith(f"{ROOT}.{name}.") for name in ABOVE_PIPELINES)


def test_every_package_has_a_layer() -> None:
    packages = {package_of(name) for name in source_modules()}
    listed = [name for layer in LAYERS for name in layer]
    assert len(listed) == len(set(listed)), "a package is in two layers"
    assert sorted(packages - set(listed)) == [], "packages without a layer: add them to LAYERS"
    assert sorted(set(listed) - packages) == [], "LAYERS names packages that do not exist"


def test_every_import_points_down_the_layers() -> None:
    found = imports_against_the_layers(import_graph())
    assert not found, ("imports must point to a lower layer (tests/core/test_layers.py LAYERS, "
                       "docs/architecture.md):\n" + "\n".join(found))


def test_the_layer_check_finds_an_import_up_or_across() -> None:
    layers = (("a",), ("b", "c"), ("d",))
    graph = {f"{ROOT}.d.x": {f"{ROOT}.a.y", f"{ROOT}.b"},    # down: fine
             f"{ROOT}.a.y": {f"{ROOT}.d.x"},                   # up
             f"{ROOT}.b.z": {f"{ROOT}.c.w", f"{ROOT}.b.v"},    # across one layer; own package
             f"{ROOT}.c.w": {ROOT}}                            # the package itself: fine
    assert imports_against_the_layers(graph, layers) == [
        f"{ROOT}.a.y (a) imports {ROOT}.d.x (d)", f"{ROOT}.b.z (b) imports {ROOT}.c.w (c)"]


def test_pipelines_never_import_another_pipeline() -> None:
    found = []
    for path in sorted(PIPELINES.rglob("*.py")):
        own = path.relative_to(PIPELINES).parts[0]
        if own == "__init__.py":
            continue
        for module in imported_modules(path):
            other = pipeline_of(module)
            if other and other != own:
                found.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not found, "cross-pipeline imports:\n" + "\n".join(found)


def test_shared_layer_imports_no_pipeline_and_nothing_above() -> None:
    below = [path for name in SHARED for path in (PACKAGE / name).rglob("*.py")]
    assert len(below) > 30, "the shared sub-packages were not found"
    found = [f"{path.relative_to(PACKAGE)} imports {module}"
             for path in sorted(below) for module in imported_modules(path)
             if pipeline_of(module) or module == f"{ROOT}.pipelines"
             or is_above_pipelines(module)]
    assert not found, ("the shared layer must not depend on a pipeline, the registry, hooks, "
                       "settings or the command line:\n" + "\n".join(found))


def test_no_import_cycle_in_src() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_import_cycle_between_packages() -> None:
    cycle = find_cycle(package_graph(import_graph()))
    assert cycle is None, "package cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_package_check_finds_a_cycle_the_modules_do_not_have() -> None:
    """a.x imports b.y and b.z imports a.w: no module imports itself back, but the packages
    do."""
    planted = {f"{ROOT}.a.x": {f"{ROOT}.b.y"}, f"{ROOT}.a.w": set(),
               f"{ROOT}.b.y": set(), f"{ROOT}.b.z": {f"{ROOT}.a.w"}, f"{ROOT}.c": {ROOT}}
    assert find_cycle(planted) is None
    assert package_graph(planted) == {"a": {"b"}, "b": {"a"}, "c": set()}
    assert find_cycle(package_graph(planted)) == ["a", "b", "a"]


def test_package_root_holds_few_modules() -> None:
    modules = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(modules) <= MAX_ROOT_MODULES, (
        f"{len(modules)} modules at the package root (at most {MAX_ROOT_MODULES}; put shared "
        f"code in a sub-package): {', '.join(modules)}")
    for entry in ("__init__.py", "__main__.py", "settings.py", "pipeline_registry.py"):
        assert entry in modules
    # The hooks are a sub-package (one module per concern), still above the pipelines.
    assert (PACKAGE / "hooks" / "__init__.py").is_file()
    hooks = [module_name(path) for path in sorted((PACKAGE / "hooks").rglob("*.py"))]
    assert f"{ROOT}.hooks" in hooks and len(hooks) > 1
    assert all(is_above_pipelines(name) for name in hooks)


def test_the_check_sees_relative_and_nested_imports() -> None:
    """The parser itself: a relative import and an import inside a function are found."""
    names = imported_modules(PIPELINES / "predict" / "nodes.py")
    assert f"{ROOT}.images.decoding" in names
    names = imported_modules(PIPELINES / "predict" / "pipeline.py")
    assert f"{ROOT}.pipelines.predict.nodes" in names
    assert pipeline_of(f"{ROOT}.pipelines.training.nodes") == "training"
    # cli/commands.py imports the predict nodes inside a function: that edge is in the graph.
    assert f"{ROOT}.pipelines.predict.nodes" in import_graph()[f"{ROOT}.cli.commands"]
