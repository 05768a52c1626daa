"""The package layering (README.md, "Development"), checked on the source with `ast` (no imports executed).

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
    # The engine knows nothing of how the server is configured or reached: it takes EngineSettings and an
    # injected metrics interface (service.engine.execution.engine.EngineMetrics).
    "service/engine": {"trainer", "grpc", "grpc_health", "grpc_reflection", "prometheus_client", "service.config",
                       "service.metrics", "service.server", "service.servicer", "service.convert", "service.http",
                       "service.interceptors", "service.status", "service.lifecycle", "service.health"},
}
# Modules imported without torch, directly or through each other: the activation-only server's part of core
# (numpy is heavy there too), and the engine's request contract (numpy allowed: EncodeActivations uses it).
TORCH_FREE = {
    "stack format": (("core", "core.config", "core.errors", "core.stack", "core.stack.manifest"), HEAVY),
    "request contract": (("service.engine.contract.validation", "service.engine.contract.encode_spec",
                          "service.engine.contract.settings"), HEAVY - {"numpy"}),
}


def imported_modules(path: Path, *, runtime_only: bool = False) -> set[str]:
    """Every absolute module an import statement in `path` names (`from a.b import c` gives a.b and a.b.c);
    `runtime_only` leaves out the `if TYPE_CHECKING:` blocks (they never run)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    if runtime_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                node.body = []
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def violations(root: Path, package: str, forbidden: set[str]) -> list[str]:
    return [f"{path.relative_to(root)} imports {module}"
            for path in sorted((root / package).rglob("*.py")) if "_pb2" not in path.name
            for module in sorted(imported_modules(path)) if _matches(module, forbidden)]


def _matches(module: str, names: set[str]) -> bool:
    """Whether `module` is one of `names` or inside one of them (`a.b.c` is inside `a` and `a.b`)."""
    parts = module.split(".")
    return any(".".join(parts[:i]) in names for i in range(1, len(parts) + 1))


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


@pytest.mark.parametrize("part", sorted(TORCH_FREE))
def test_the_torch_free_parts_import_no_heavy_library(part):
    roots, heavy = TORCH_FREE[part]
    seen: set[str] = set()
    todo = list(roots)
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
        for imported in imported_modules(path, runtime_only=True) | set(parents):
            assert imported.split(".")[0] not in heavy, f"{module} ({path.relative_to(ROOT)}) imports {imported}"
            if imported.split(".")[0] in PACKAGES:
                todo.append(imported)
    assert set(roots) <= seen


def test_the_rules_catch_a_violation(tmp_path):
    """The checker itself: upward imports planted in a copy of core are reported."""
    bad = tmp_path / "core" / "stack" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("from service.engine.stacks.served import ServedStack\nimport trainer\n")
    assert violations(tmp_path, "core", FORBIDDEN["core"]) == [
        "core/stack/bad.py imports service.engine.stacks.served",
        "core/stack/bad.py imports service.engine.stacks.served.ServedStack",
        "core/stack/bad.py imports trainer",
    ]
    engine = tmp_path / "service" / "engine" / "execution" / "bad.py"
    engine.parent.mkdir(parents=True)
    engine.write_text("from service.config import ServerConfig\nfrom service.metrics import Metrics\nimport grpc\n"
                      "from service.engine.contract.inputs import Limits\n")
    assert violations(tmp_path, "service/engine", FORBIDDEN["service/engine"]) == [
        "service/engine/execution/bad.py imports grpc",
        "service/engine/execution/bad.py imports service.config",
        "service/engine/execution/bad.py imports service.config.ServerConfig",
        "service/engine/execution/bad.py imports service.metrics",
        "service/engine/execution/bad.py imports service.metrics.Metrics",
    ]


# --- import cycles -------------------------------------------------------------------------------------------
# Every import statement counts, at module level or inside a function: an import hidden in a function to break
# a circle still says that some code lives in the wrong module. Package roots and their module names:
CYCLE_ROOTS = {"core": ROOT / "core", "trainer": ROOT / "trainer", "service": ROOT / "service",
               "featurewire": ROOT / "clients" / "python" / "featurewire"}


def module_files(roots: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> source file, for every module under the roots (generated `_pb2` code left out)."""
    modules: dict[str, Path] = {}
    for name, directory in roots.items():
        for path in sorted(directory.rglob("*.py")):
            if "_pb2" in path.name:
                continue
            parts = [name, *path.relative_to(directory).with_suffix("").parts]
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports. `from a.b import c` points at a.b.c when that is a module,
    else at a.b; a package's own `__init__` running first is Python's doing, not an edge."""
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    if target in modules:
                        edges.add(target)
                    elif node.module in modules:
                        edges.add(node.module)
        graph[module] = edges - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted: every import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_forms_a_cycle():
    assert cycles(import_graph(module_files(CYCLE_ROOTS))) == []


def test_the_cycle_check_catches_a_function_level_circle(tmp_path):
    """The checker itself: a circle held together by an import inside a function is reported."""
    package = tmp_path / "core" / "sae"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "base.py").write_text("def build():\n    from core.sae import registry\n    return registry\n")
    (package / "registry.py").write_text("from core.sae.base import build\n")
    (package / "leaf.py").write_text("from core.sae.base import build\n")
    graph = import_graph(module_files({"core": tmp_path / "core"}))
    assert cycles(graph) == [["core.sae.base", "core.sae.registry"]]
