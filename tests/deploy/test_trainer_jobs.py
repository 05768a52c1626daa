"""The trainer jobs: the single-node Job and the Indexed Job that runs torchrun across pods. Their
commands are parsed by the real parsers (trainer's and torchrun's); the distributed Job's shell wrapper
is run with a stand-in torchrun to see the argv each pod index would exec."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser as torchrun_parser

from tests.deploy.conftest import K8S, TRAINERS, Doc, of_kind, one, selects
from trainer.cli import build_parser as trainer_parser
from trainer.training.config import load_config

SERVER_CLAIM = "featurewire-data"
# The trainer reads FEATUREWIRE_CACHE as the servers do: the same /cache volume (subPath models).
TRAINER_CACHE = "/cache"


def job(docs: list[Doc]) -> Doc:
    return one(docs, "Job")


def container(docs: list[Doc]) -> Doc:
    containers = job(docs)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env(docs: list[Doc]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(docs).get("env", [])}


def mounts(docs: list[Doc]) -> dict[str, Doc]:
    return {m["mountPath"]: m for m in container(docs)["volumeMounts"]}


def check_train_args(docs: list[Doc], args: list[str]) -> None:
    """`train --config C --out O`: C is train.toml from the mounted ConfigMap, O on the stacks volume."""
    parsed = trainer_parser().parse_args(args)
    assert args[0] == "train"
    volumes = {v["name"]: v for v in job(docs)["spec"]["template"]["spec"]["volumes"]}
    config = Path(parsed.config)
    config_mount = mounts(docs)[str(config.parent)]
    configmap = one(docs, "ConfigMap", volumes[config_mount["name"]]["configMap"]["name"])
    assert config.name in configmap["data"]
    out_mount = next(m for path, m in mounts(docs).items() if Path(parsed.out).is_relative_to(path))
    assert out_mount["mountPath"] == "/stacks" and not out_mount.get("readOnly", False)
    assert volumes[out_mount["name"]]["persistentVolumeClaim"]["claimName"] == SERVER_CLAIM


@pytest.mark.parametrize("target", TRAINERS)
def test_trainer_pods_are_locked_down_and_sized(render: Callable[[str], list[Doc]], target: str) -> None:
    docs = render(target)
    spec = job(docs)["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = container(docs)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    resources = container(docs)["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
    # The model cache is the servers' cache volume, where the trainer looks for it.
    assert env(docs)["FEATUREWIRE_CACHE"] == TRAINER_CACHE
    assert mounts(docs)[TRAINER_CACHE]["subPath"] == "models" and mounts(docs)["/stacks"]["subPath"] == "stacks"
    assert "/tmp" in mounts(docs)
    # Namespace-less: applied with -n next to the serving overlay whose volume it writes.
    assert all("namespace" not in d["metadata"] for d in docs)
    policy = one(docs, "NetworkPolicy")["spec"]
    assert selects(policy["podSelector"]["matchLabels"], job(docs)["spec"]["template"]["metadata"]["labels"])


def test_train_toml_is_a_valid_training_config() -> None:
    config = load_config(K8S / "trainer" / "common" / "train.toml")
    assert config.stack.hookpoints


def test_single_node_job_runs_the_trainer(render: Callable[[str], list[Doc]]) -> None:
    docs = render("trainer/single-node")
    c = container(docs)
    assert c["command"] == ["featurewire-train"]
    check_train_args(docs, c["args"])
    assert job(docs)["spec"].get("completionMode", "NonIndexed") == "NonIndexed"


@pytest.fixture(scope="module")
def distributed(render: Callable[[str], list[Doc]]) -> list[Doc]:
    return render("trainer/distributed")


def torchrun_argv(docs: list[Doc], index: int, tmp_path: Path) -> list[str]:
    """Run the container's command as pod `index` would, with a torchrun that prints its argv."""
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no POSIX shell to run the job's command with")
    c = container(docs)
    assert c["command"][:2] == ["/bin/sh", "-c"] and len(c["args"]) == 1
    fake = tmp_path / "torchrun"
    fake.write_text('#!/bin/sh\nfor arg in "$@"; do printf "%s\\n" "$arg"; done\n')
    fake.chmod(0o755)
    environ = {**env(docs), "JOB_COMPLETION_INDEX": str(index), "PATH": f"{tmp_path}{os.pathsep}/usr/bin:/bin"}
    result = subprocess.run([sh, "-c", c["args"][0]], env=environ, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_indexed_job_runs_torchrun_with_c10d_rendezvous_on_pod_zero(distributed: list[Doc], tmp_path: Path) -> None:
    spec = job(distributed)["spec"]
    assert spec["completionMode"] == "Indexed"
    nodes = spec["completions"]
    assert nodes >= 2 and spec["parallelism"] == nodes
    name, subdomain = job(distributed)["metadata"]["name"], spec["template"]["spec"]["subdomain"]
    for index in range(nodes):
        argv = torchrun_argv(distributed, index, tmp_path)
        args = torchrun_parser().parse_args(argv)
        assert int(args.nnodes) == nodes, shlex.join(argv)
        assert int(args.nproc_per_node) >= 1
        assert args.rdzv_backend == "c10d"
        host, _, port = args.rdzv_endpoint.rpartition(":")
        assert host == f"{name}-0.{subdomain}"
        assert int(port) in {p["containerPort"] for p in container(distributed)["ports"]}
        assert args.rdzv_conf == f"is_host={'true' if index == 0 else 'false'}"
        assert args.rdzv_id != "none" and args.max_restarts >= 1
        assert args.module and args.training_script == "trainer"
        check_train_args(distributed, args.training_script_args)


def test_rendezvous_service_gives_every_pod_a_name(distributed: list[Doc]) -> None:
    template = job(distributed)["spec"]["template"]
    service = one(distributed, "Service", template["spec"]["subdomain"])["spec"]
    assert service["clusterIP"] == "None" and service["publishNotReadyAddresses"] is True
    assert selects(service["selector"], template["metadata"]["labels"])
    # Only this job's pods: the selector is narrower than what every trainer pod carries.
    assert "app.kubernetes.io/instance" in service["selector"]
    assert len(of_kind(distributed, "Service")) == 1


def test_distributed_pods_get_a_gpu_and_shared_memory(distributed: list[Doc]) -> None:
    spec = job(distributed)["spec"]["template"]["spec"]
    gpus = container(distributed)["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus >= 1 and int(env(distributed)["NPROC_PER_NODE"]) == gpus  # one process per GPU
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    shm = mounts(distributed)["/dev/shm"]
    volume = next(v for v in spec["volumes"] if v["name"] == shm["name"])
    assert volume["emptyDir"]["medium"] == "Memory"
