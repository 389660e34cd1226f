"""The layers depend downward only: pipelines use the core layer, datasets/ and models/, never
each other; the core layer uses no pipeline. Checked on the source (imports parsed with ast), so
an import hidden inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "neuroblastoma_cnn"
PIPELINES = PACKAGE / "pipelines"
#: Modules above the pipelines: they wire them (registry, settings, hooks) or run them (cli).
ABOVE_PIPELINES = {"pipeline_registry", "settings", "hooks", "cli", "__main__"}


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


def pipeline_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] == ["neuroblastoma_cnn", "pipelines"] and len(parts) > 2:
        return parts[2]
    return None


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


def test_core_datasets_and_models_import_no_pipeline() -> None:
    below = [p for p in PACKAGE.glob("*.py") if p.stem not in ABOVE_PIPELINES]
    below += [*(PACKAGE / "datasets").rglob("*.py"), *(PACKAGE / "models").rglob("*.py")]
    found = [f"{path.relative_to(PACKAGE)} imports {module}"
             for path in sorted(below) for module in imported_modules(path)
             if pipeline_of(module) or module.startswith("neuroblastoma_cnn.pipeline_registry")]
    assert not found, "the core layer must not depend on a pipeline:\n" + "\n".join(found)


def test_the_check_sees_relative_and_nested_imports(tmp_path: Path) -> None:
    """The parser itself: a relative import and an import inside a function are found."""
    folder = PIPELINES / "predict"
    probe = folder / "nodes.py"
    names = imported_modules(probe)
    assert "neuroblastoma_cnn.imaging" in names
    names = imported_modules(PIPELINES / "predict" / "pipeline.py")
    assert "neuroblastoma_cnn.pipelines.predict.nodes" in names
    assert pipeline_of("neuroblastoma_cnn.pipelines.training.nodes") == "training"
