"""Every path that a README or Makefile command writes is ignored by git, so the tree stays clean after
`make test`, `make demo`, `make lock`, `make lint-k8s` or a benchmark (checked with `git check-ignore`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs git")
WRITTEN = [
    ".venv/bin/python", ".venv-k8s/bin/python", ".venv-lock/bin/python",
    "runs/demo/stack/stack.json", "runs/report/sections/1.md", "bench/out/serve.json",
    "clients/python/build/lib/featurewire/client.py", "clients/python/featurewire_client.egg-info/PKG-INFO",
    "featurewire.egg-info/PKG-INFO", "build/lib/core/config.py", "dist/featurewire-0.1.0.tar.gz",
    "core/__pycache__/config.cpython-311.pyc", ".pytest_cache/README.md", ".ruff_cache/CACHEDIR.TAG",
    ".hypothesis/examples/x",
]


@pytest.mark.parametrize("path", WRITTEN)
def test_command_outputs_are_ignored(path: str) -> None:
    result = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
    assert result.returncode == 0, f"{path} is written by a command but not covered by .gitignore"


def test_sources_are_not_ignored() -> None:
    for path in ("core/config.py", "clients/python/featurewire/client.py", "constraints.txt", "Makefile"):
        assert subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT).returncode == 1, path
