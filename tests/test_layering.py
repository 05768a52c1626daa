"""The package layering of DESIGN.md §2, checked on the source with `ast` (no imports executed).

Three layers, every import pointing down: `core` (host model runtime, SAEs, stack format and runtime)
imports neither `trainer` nor `service`; `trainer` and `service` build on `core` and never import each
other; the client imports none of them and no torch. `core` never imports grpc or metrics, and the
torch-free part of the stack format stays importable without torch (the activation-only server).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "trainer", "service")
HEAVY = {"torch", "transformers", "safetensors", "numpy", "onnx", "onnxruntime"}
# What each package may not import (top-level names).
FORBIDDEN = {
    "core": {"trainer", "service", "grpc", "grpc_health", "grpc_reflection", "prometheus_client", "featurewire"},
    "trainer": {"service", "grpc", "featurewire"},
    "service": {"trainer"},
    "clients/python/featurewire": {"core", "trainer", "service", "torch", "transformers", "safetensors"},
}
# Modules the activation-only server (no torch) imports from core, directly or through each other.
TORCH_FREE = ("core", "core.config", "core.errors", "core.stack", "core.stack.manifest")


def imported_modules(path: Path) -> set[str]:
    """Every absolute module an import statement in `path` names (`from a.b import c` gives a.b and a.b.c)."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def violations(root: Path, package: str, forbidden: set[str]) -> list[str]:
    return [f"{path.relative_to(root)} imports {module}"
            for path in sorted((root / package).rglob("*.py")) if "_pb2" not in path.name
            for module in sorted(imported_modules(path)) if module.split(".")[0] in forbidden]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_every_import_points_down(package):
    assert (ROOT / package).is_dir()
    assert violations(ROOT, package, FORBIDDEN[package]) == []


def _source(module: str) -> Path | None:
    relative = Path(*module.split("."))
    for candidate in (ROOT / relative / "__init__.py", ROOT / f"{relative}.py"):
        if candidate.is_file():
            return candidate
    return None


def test_the_torch_free_stack_format_imports_no_heavy_library():
    seen: set[str] = set()
    todo = list(TORCH_FREE)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        parents = [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b runs a/__init__ first
        path = _source(module)
        if path is None:
            continue  # `from core.x import name`: the name is not a module
        for imported in imported_modules(path) | set(parents):
            assert imported.split(".")[0] not in HEAVY, f"{module} ({path.relative_to(ROOT)}) imports {imported}"
            if imported.split(".")[0] in PACKAGES:
                todo.append(imported)
    assert {"core.stack.manifest", "core.errors"} <= seen


def test_the_rules_catch_a_violation(tmp_path):
    """The checker itself: upward imports planted in a copy of core are reported."""
    bad = tmp_path / "core" / "stack" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("from service.engine.served import ServedStack\nimport trainer\n")
    assert violations(tmp_path, "core", FORBIDDEN["core"]) == [
        "core/stack/bad.py imports service.engine.served",
        "core/stack/bad.py imports service.engine.served.ServedStack",
        "core/stack/bad.py imports trainer",
    ]
