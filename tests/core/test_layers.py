"""The layers depend downward only, and no module imports itself back.

- pipelines use the shared sub-packages, ``datasets/`` and ``models/``, never each other;
- the shared sub-packages (``core``, ``images``, ``runtime``, ``analysis``, ``tracking``) and
  ``datasets/``, ``models/`` use no pipeline and nothing that wires or runs the pipelines
  (``pipeline_registry``, ``hooks``, ``settings``, ``cli``);
- the import graph of ``src/`` has no cycle;
- the package root holds the Kedro entry points and sub-packages (``hooks/`` is one), few
  modules.

Checked on the source (imports parsed with ast), so an import hidden inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "neuroblastoma_cnn"
PIPELINES = PACKAGE / "pipelines"
#: The shared layer, below the pipelines (docs/architecture.md says what each holds).
SHARED = ("core", "images", "runtime", "analysis", "tracking", "datasets", "models")
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


def pipeline_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] == ["neuroblastoma_cnn", "pipelines"] and len(parts) > 2:
        return parts[2]
    return None


def is_above_pipelines(module: str) -> bool:
    return any(module == f"neuroblastoma_cnn.{name}"
               or module.startswith(f"neuroblastoma_cnn.{name}.") for name in ABOVE_PIPELINES)


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
             if pipeline_of(module) or module == "neuroblastoma_cnn.pipelines"
             or is_above_pipelines(module)]
    assert not found, ("the shared layer must not depend on a pipeline, the registry, hooks, "
                       "settings or the command line:\n" + "\n".join(found))


def test_no_import_cycle_in_src() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


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
    assert "neuroblastoma_cnn.hooks" in hooks and len(hooks) > 1
    assert all(is_above_pipelines(name) for name in hooks)


def test_the_check_sees_relative_and_nested_imports() -> None:
    """The parser itself: a relative import and an import inside a function are found."""
    names = imported_modules(PIPELINES / "predict" / "nodes.py")
    assert "neuroblastoma_cnn.images.decoding" in names
    names = imported_modules(PIPELINES / "predict" / "pipeline.py")
    assert "neuroblastoma_cnn.pipelines.predict.nodes" in names
    assert pipeline_of("neuroblastoma_cnn.pipelines.training.nodes") == "training"
    # cli/commands.py imports the predict nodes inside a function: that edge is in the graph.
    assert "neuroblastoma_cnn.pipelines.predict.nodes" in import_graph()[
        "neuroblastoma_cnn.cli.commands"]
