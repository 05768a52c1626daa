"""Rendering k8s/ with `kubectl kustomize`, once per kustomization per session.

kubectl is optional on a developer machine: `make test` installs Debian's kubernetes-client when it is
missing. That kubectl (1.20) embeds kustomize v2, which has neither `components` nor the `labels`
field that k8s/ uses, so the rendering tests skip with a message naming what is missing, and only
then: with a recent enough kubectl, a kustomization that fails to render fails its test.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
# `components`, `labels` and inline JSON6902 `patches` as k8s/ writes them; kubectl 1.27 embeds v5.0.
KUSTOMIZE_MIN = (5, 0)

Doc = dict[str, Any]


def kustomizations(group: str) -> list[str]:
    """Every directory under k8s/<group>/ that renders on its own (a Kustomization, not a Component)."""
    found = []
    for path in sorted((K8S / group).glob("*/kustomization.yaml")):
        if yaml.safe_load(path.read_text())["kind"] == "Kustomization":
            found.append(path.parent.relative_to(K8S).as_posix())
    return found


OVERLAYS = kustomizations("overlays")
TRAINERS = kustomizations("trainer")


def _kubectl() -> tuple[str | None, str]:
    """(kubectl path, "") when its kustomize can render k8s/, else (None, why not)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None, ("kubectl is not installed; `make test` installs Debian's kubernetes-client when apt-get "
                      "is available, or install kubectl >= 1.27")
    result = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True, timeout=60)
    match = re.search(r"Kustomize Version:\s*v?(\d+)\.(\d+)", result.stdout)
    if match is None or (int(match[1]), int(match[2])) < KUSTOMIZE_MIN:
        found = (f"kustomize v{match[1]}.{match[2]}" if match
                 else "an old kustomize (kubectl < 1.24 reports none; Debian's kubectl is 1.20, with kustomize v2)")
        need = ".".join(map(str, KUSTOMIZE_MIN))
        return None, (f"`kubectl kustomize` here embeds {found}, which lacks the `components` and `labels` "
                      f"fields k8s/ uses; rendering needs kustomize >= v{need} (kubectl >= 1.27)")
    return kubectl, ""


@pytest.fixture(scope="session")
def kubectl() -> str:
    path, why = _kubectl()
    if path is None:
        pytest.skip(why)
    return path


@pytest.fixture(scope="session")
def render(kubectl: str) -> Callable[[str], list[Doc]]:
    """render("overlays/dev-cpu") -> the rendered objects, cached for the session."""
    cache: dict[str, list[Doc]] = {}

    def _render(target: str) -> list[Doc]:
        if target not in cache:
            result = subprocess.run([kubectl, "kustomize", str(K8S / target)], capture_output=True, text=True,
                                    timeout=120)
            assert result.returncode == 0, f"kubectl kustomize k8s/{target} failed:\n{result.stderr}"
            cache[target] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        return cache[target]

    return _render


def env_file(path: Path) -> dict[str, str]:
    """A kustomize `envs:` file as a dict (KEY=VALUE lines, # comments)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value
    return values


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())
