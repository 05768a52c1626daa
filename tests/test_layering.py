"""The package layering of DESIGN.md §2, checked on the source with `ast` (no imports executed).

- the client imports neither torch/transformers nor the service or trainer packages;
- the service takes from the trainer only the torch-only SAE and stack-format modules;
- the trainer takes from the service only the grpc-free host model runtime (loading, hookpoints,
  hooks) plus config and errors, and that runtime itself never imports grpc, metrics or servers.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HOST_RUNTIME = {
    "service.config",
    "service.errors",
    "service.engine",
    "service.engine.devices",
    "service.engine.gguf_cache",
    "service.engine.hookpoints",
    "service.engine.hooks",
    "service.engine.host_model",
    "service.engine.loading",
    "service.engine.smoke_models",
}


def imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def imports_of(package: Path) -> dict[Path, set[str]]:
    return {path: imported_modules(path) for path in package.rglob("*.py")}


def _top(module: str) -> str:
    return module.split(".")[0]


def test_client_is_free_of_heavy_and_server_imports():
    banned = {"torch", "transformers", "safetensors", "service", "trainer"}
    for path, modules in imports_of(ROOT / "clients" / "python" / "featurewire").items():
        assert not {_top(m) for m in modules} & banned, f"{path} imports {sorted(modules)}"


def test_service_takes_only_sae_and_stack_modules_from_the_trainer():
    for path, modules in imports_of(ROOT / "service").items():
        for module in modules:
            if _top(module) == "trainer":
                assert module.startswith(("trainer.sae", "trainer.stack")), f"{path} imports {module}"


def test_trainer_takes_only_the_host_runtime_from_the_service():
    for path, modules in imports_of(ROOT / "trainer").items():
        for module in modules:
            if _top(module) == "service":
                assert module in HOST_RUNTIME or module.rsplit(".", 1)[0] in HOST_RUNTIME, f"{path}: {module}"


def test_host_runtime_is_grpc_free():
    for name in HOST_RUNTIME:
        relative = Path(*name.split("."))
        path = ROOT / (f"{relative}/__init__.py" if (ROOT / relative).is_dir() else f"{relative}.py")
        for module in imported_modules(path):
            assert _top(module) not in {"grpc", "prometheus_client", "trainer"}, f"{path}: {module}"
            if _top(module) == "service":
                assert module in HOST_RUNTIME or module.rsplit(".", 1)[0] in HOST_RUNTIME, f"{path}: {module}"
