"""The Dockerfile, read as instructions (no Docker daemon needed): multi-stage with a CUDA and a CPU
variant, torch pinned and installed first, a non-root user, featurewire-serve as entrypoint, and nothing
model-sized in the build context or the image. `make lint-k8s` runs hadolint and checkov on it too."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from dataclasses import dataclass

import pytest

from service.config import ServerConfig
from tests.deploy.conftest import K8S, ROOT, env_file


@dataclass(frozen=True)
class Instruction:
    op: str
    args: str
    stage: int  # index of the FROM it belongs to (-1 before the first)


def instructions() -> list[Instruction]:
    """Logical instructions: comments dropped, backslash continuations joined."""
    found: list[Instruction] = []
    stage, pending = -1, ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        pending += " " + stripped.removesuffix("\\").strip() if pending else stripped.removesuffix("\\").strip()
        if stripped.endswith("\\"):
            continue
        op, _, args = pending.partition(" ")
        if op.upper() == "FROM":
            stage += 1
        found.append(Instruction(op.upper(), args.strip(), stage))
        pending = ""
    return found


def stages(found: list[Instruction]) -> dict[str, int]:
    """Stage name → index, from `FROM image AS name`."""
    named = {}
    for ins in found:
        if ins.op == "FROM":
            parts = ins.args.split()
            if len(parts) == 3 and parts[1].upper() == "AS":
                named[parts[2]] = ins.stage
    return named


def arg_defaults(found: list[Instruction]) -> dict[str, str]:
    return dict(ins.args.split("=", 1) for ins in found if ins.op == "ARG" and "=" in ins.args)


def final(found: list[Instruction]) -> list[Instruction]:
    last = max(ins.stage for ins in found)
    return [ins for ins in found if ins.stage == last]


def test_multi_stage_with_cpu_and_gpu_variants() -> None:
    found = instructions()
    named = stages(found)
    assert {"base-cpu", "base-gpu", "build", "runtime"} <= set(named)
    assert list(named)[-1] == "runtime"
    defaults = arg_defaults(found)
    assert defaults["VARIANT"] == "gpu"
    assert defaults["CUDA_IMAGE"].startswith("nvidia/cuda:") and "-runtime-" in defaults["CUDA_IMAGE"]
    assert "slim" in defaults["PYTHON_IMAGE"]
    assert any(ins.op == "FROM" and ins.args.startswith("base-${VARIANT}") for ins in found)
    copies = [ins.args for ins in final(found) if ins.op == "COPY"]
    assert copies == ["--from=build /opt/featurewire /opt/featurewire"]  # the runtime gets the venv only


def test_torch_is_pinned_like_the_makefile_and_installed_first() -> None:
    found = instructions()
    pin = re.search(r"^TORCH\s*:=\s*torch==(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert pin, "the Makefile pins torch"
    assert arg_defaults(found)["TORCH_VERSION"] == pin[1]
    runs = [ins.args for ins in found if ins.op == "RUN"]
    torch_run = next(i for i, run in enumerate(runs) if "torch==${TORCH_VERSION}" in run)
    project_run = next(i for i, run in enumerate(runs)
                       if re.search(r"pip install -c constraints\.txt \./clients/python \.", run))
    assert torch_run < project_run
    cpu = re.search(r"cpu\)\s*pip install --index-url \"\$\{TORCH_CPU_INDEX\}\" \"torch==\$\{TORCH_VERSION\}\"",
                    runs[torch_run])
    assert cpu and arg_defaults(found)["TORCH_CPU_INDEX"].endswith("/whl/cpu")


def test_runs_as_a_non_root_user_with_featurewire_serve() -> None:
    runtime = final(instructions())
    users = [ins.args for ins in runtime if ins.op == "USER"]
    assert users, "the runtime stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0  # numeric, so runAsNonRoot can verify it
    entrypoint = json.loads(next(ins.args for ins in runtime if ins.op == "ENTRYPOINT"))
    assert entrypoint == ["featurewire-serve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "featurewire-serve" in scripts
    assert json.loads(next(ins.args for ins in runtime if ins.op == "CMD")) == ["serve"]
    assert any(ins.op == "HEALTHCHECK" for ins in runtime)
    config = ServerConfig.from_env(env_file(K8S / "base" / "config.env"))  # the ports Kubernetes opens
    exposed = {int(p) for ins in runtime if ins.op == "EXPOSE" for p in ins.args.split()}
    assert exposed == {config.port, config.http_port, config.metrics_port}


def test_cache_path_agrees_with_the_manifests() -> None:
    env = {}
    for ins in final(instructions()):
        if ins.op == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(ins.args)))
    assert env["FEATUREWIRE_CACHE"] == env_file(K8S / "base" / "config.env")["FEATUREWIRE_CACHE"] == "/cache"
    assert env["HOME"] == "/home/featurewire"  # the trainer jobs mount the model cache under it
    assert env["HF_HUB_OFFLINE"] == "1"


def test_nothing_model_sized_is_copied() -> None:
    for ins in instructions():
        if ins.op in ("COPY", "ADD"):
            sources = [a for a in ins.args.split()[:-1] if not a.startswith("--")]
            assert ins.op == "COPY", "ADD fetches URLs and unpacks archives; use COPY"
            for source in sources:
                assert source not in (".", "./", "*"), f"COPY {source} sends the whole context"
                assert not re.search(r"(^|/)(runs|\.venv[^/]*|stacks|models?)(/|$)|\.(safetensors|gguf|onnx|pt|bin)$",
                                     source), source


def _glob_regex(glob: str) -> str:
    """A .dockerignore glob as a regex: `*` stays within one path segment, a leading `**/` spans any."""
    if glob.startswith("**/"):
        return "(?:.*/)?" + _glob_regex(glob[3:])
    return fnmatch.translate(glob).replace(".*", "[^/]*")


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; a match on a parent directory counts."""
    ignored = False
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        regex = _glob_regex(pattern.lstrip("!").rstrip("/"))
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            ignored = not pattern.startswith("!")
    return ignored


@pytest.mark.parametrize(("path", "ignored"), [
    ("service/server.py", False),
    ("core/stack/reader.py", False),
    ("clients/python/featurewire/client.py", False),
    ("pyproject.toml", False),
    ("runs/demo/stack/stack.json", True),
    ("runs/demo/stack/stage0.safetensors", True),
    ("trainer/stacks/model.safetensors", True),
    ("service/weights.gguf", True),
    (".venv/bin/python", True),
    (".git/HEAD", True),
    ("tests/deploy/test_dockerfile.py", True),
    ("service/__pycache__/server.cpython-311.pyc", True),
])
def test_dockerignore_sends_only_the_sources(path: str, ignored: bool) -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "an allow-list: ignore everything, then re-include the sources"
    assert _ignored(path, patterns) is ignored
