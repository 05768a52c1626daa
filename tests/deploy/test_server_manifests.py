"""What every overlay renders for the server: probes on the health service names and the gRPC port,
named ports, a locked-down pod, resources, a termination grace longer than the drain grace, Services
(appProtocol grpc, headless), PDB, NetworkPolicy, volume, and a config the server itself accepts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import pytest

from core.config import ModelConfig
from service.config import ServerConfig
from service.health import LIVENESS, READINESS
from tests.deploy.conftest import K8S, OVERLAYS, Doc, env_file, of_kind, one, selects

# The first load of the default model converts it into an empty cache (~45 s on 2 cores, minutes on a
# cold volume): the startup probe must allow at least this long before the kubelet restarts the pod.
MIN_STARTUP_SECONDS = 300
# After the drain grace the server still stops the engine and exits; keep this much slack.
MIN_SHUTDOWN_SLACK_SECONDS = 10


@pytest.fixture(params=OVERLAYS)
def docs(request: pytest.FixtureRequest, render: Callable[[str], list[Doc]]) -> list[Doc]:
    return render(request.param)


def deployment(docs: list[Doc]) -> Doc:
    return one(docs, "Deployment", "featurewire")


def pod(docs: list[Doc]) -> Doc:
    return deployment(docs)["spec"]["template"]["spec"]


def container(docs: list[Doc]) -> Doc:
    containers = pod(docs)["containers"]
    assert [c["name"] for c in containers] == ["featurewire"]
    return containers[0]


def server_env(docs: list[Doc]) -> dict[str, str]:
    """The FEATUREWIRE_* environment the container gets: its ConfigMap (envFrom) plus explicit env."""
    env: dict[str, str] = {}
    for source in container(docs).get("envFrom", []):
        env.update(one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in container(docs).get("env", []) if "value" in e})
    return env


def ports(docs: list[Doc]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container(docs)["ports"]}


def test_the_server_accepts_its_config(docs: list[Doc]) -> None:
    env = server_env(docs)
    server = ServerConfig.from_env(env)  # raises ValueError, naming the variable, on a bad value
    model = ModelConfig.from_env(env)
    assert ports(docs) == {"grpc": server.port, "http": server.http_port, "metrics": server.metrics_port}
    mounts = {m["mountPath"]: m for m in container(docs)["volumeMounts"]}
    assert str(model.cache_dir) in mounts and not mounts[str(model.cache_dir)].get("readOnly", False)
    for stack in server.stacks:
        assert any(stack.is_relative_to(path) for path in mounts), f"stack {stack} is on no mounted volume"


def test_probes_use_the_health_service_names_on_the_grpc_port(docs: list[Doc]) -> None:
    c = container(docs)
    grpc_port = ports(docs)["grpc"]
    startup, readiness, liveness = c["startupProbe"], c["readinessProbe"], c["livenessProbe"]
    for probe in (startup, readiness, liveness):
        assert probe["grpc"]["port"] == grpc_port
    assert startup["grpc"]["service"] == READINESS
    assert readiness["grpc"]["service"] == READINESS
    assert liveness["grpc"]["service"] == LIVENESS != READINESS
    assert startup["failureThreshold"] * startup["periodSeconds"] >= MIN_STARTUP_SECONDS


def test_termination_grace_outlasts_the_drain(docs: list[Doc]) -> None:
    drain = ServerConfig.from_env(server_env(docs)).drain_grace_s
    grace = pod(docs)["terminationGracePeriodSeconds"]
    assert grace >= drain + MIN_SHUTDOWN_SLACK_SECONDS, f"terminationGracePeriodSeconds {grace} vs drain {drain} s"


def test_pod_runs_locked_down(docs: list[Doc]) -> None:
    spec = pod(docs)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] > 0
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    sc = container(docs)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert sc.get("privileged", False) is False
    # With a read-only root, /tmp is an emptyDir.
    volumes = {v["name"]: v for v in spec["volumes"]}
    tmp = next(m for m in container(docs)["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in volumes[tmp["name"]]


def test_models_and_stacks_come_from_the_claimed_volume(docs: list[Doc]) -> None:
    volumes = {v["name"]: v for v in pod(docs)["volumes"]}
    claims = {d["metadata"]["name"]: d for d in of_kind(docs, "PersistentVolumeClaim")}
    mounts = {m["mountPath"]: m for m in container(docs)["volumeMounts"]}
    for path in ("/cache", "/stacks"):
        claim = volumes[mounts[path]["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim in claims
    assert mounts["/stacks"]["readOnly"] is True


def test_resources_are_requested_and_limited(docs: list[Doc]) -> None:
    resources = container(docs)["resources"]
    for key in ("cpu", "memory"):
        assert key in resources["requests"] and key in resources["limits"]
    assert _bytes(resources["limits"]["memory"]) >= _bytes(resources["requests"]["memory"])


def test_services_balance_grpc(docs: list[Doc]) -> None:
    labels = deployment(docs)["spec"]["template"]["metadata"]["labels"]
    services = {s["metadata"]["name"]: s["spec"] for s in of_kind(docs, "Service")}
    cluster_ip, headless = services["featurewire"], services["featurewire-headless"]
    assert headless["clusterIP"] == "None" and cluster_ip.get("clusterIP") != "None"
    for spec in (cluster_ip, headless):
        assert selects(spec["selector"], labels)
        grpc = next(p for p in spec["ports"] if p["name"] == "grpc")
        assert grpc["appProtocol"] == "grpc" and grpc["targetPort"] == "grpc"
    assert {p["targetPort"] for p in cluster_ip["ports"]} == set(ports(docs))


def test_disruption_budget_covers_the_servers(docs: list[Doc]) -> None:
    labels = deployment(docs)["spec"]["template"]["metadata"]["labels"]
    pdb = one(docs, "PodDisruptionBudget")["spec"]
    assert selects(pdb["selector"]["matchLabels"], labels)
    assert pdb.get("maxUnavailable", 0) >= 1 or "minAvailable" in pdb  # never blocks every eviction


def test_network_policy_opens_grpc_http_and_no_egress(docs: list[Doc]) -> None:
    labels = deployment(docs)["spec"]["template"]["metadata"]["labels"]
    policy = one(docs, "NetworkPolicy", "featurewire")["spec"]
    assert selects(policy["podSelector"]["matchLabels"], labels)
    assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == ["grpc", "http"]
    assert policy["policyTypes"] == ["Ingress", "Egress"] and policy["egress"] == []


def test_overlays_set_namespace_and_a_tagged_image(docs: list[Doc]) -> None:
    namespace = one(docs, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace["metadata"]["name"], doc["metadata"]["name"]
    image = container(docs)["image"]
    assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest")


def test_dev_cpu_is_one_small_cpu_replica(render: Callable[[str], list[Doc]]) -> None:
    docs = render("overlays/dev-cpu")
    assert deployment(docs)["spec"]["replicas"] == 1
    assert one(docs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert "nvidia.com/gpu" not in container(docs)["resources"]["limits"]
    assert container(docs)["image"].endswith("-cpu")
    assert ServerConfig.from_env(server_env(docs)) and ModelConfig.from_env(server_env(docs)).device == "cpu"


def test_prod_gpu_gets_a_gpu_monitoring_and_autoscaling(render: Callable[[str], list[Doc]]) -> None:
    docs = render("overlays/prod-gpu")
    spec, c = pod(docs), container(docs)
    assert c["resources"]["limits"]["nvidia.com/gpu"] >= 1 and c["image"].endswith("-gpu")
    assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert ModelConfig.from_env(server_env(docs)).device == "cuda"
    assert one(docs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
    # Scraped through the ClusterIP Service only (the headless one would scrape every pod twice).
    monitor = one(docs, "ServiceMonitor")["spec"]
    scraped = [s for s in of_kind(docs, "Service") if selects(monitor["selector"]["matchLabels"],
                                                              s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in scraped] == ["featurewire"]
    assert {e["port"] for e in monitor["endpoints"]} <= {p["name"] for p in scraped[0]["spec"]["ports"]}
    metrics_policy = one(docs, "NetworkPolicy", "featurewire-metrics")["spec"]
    assert [p["port"] for rule in metrics_policy["ingress"] for p in rule["ports"]] == ["metrics"]
    # The HPA owns the replica count and scales on custom metrics with a CPU fallback.
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "featurewire"}
    assert "replicas" not in deployment(docs)["spec"]
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
    kinds = [m["type"] for m in hpa["metrics"]]
    assert "Pods" in kinds and {"type": "Resource", "resource": {"name": "cpu", "target": {
        "type": "Utilization", "averageUtilization": 80}}} in hpa["metrics"]


def _bytes(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * factor
    return float(quantity)


def test_config_env_has_only_known_server_settings() -> None:
    """A typo in config.env (FEATUREWIRE_DRAIN_GRACE instead of ..._S) would be silently ignored."""
    known = {f"FEATUREWIRE_{f.name.upper()}" for f in fields(ServerConfig)}
    known |= {"FEATUREWIRE_MODEL", "FEATUREWIRE_DEVICE", "FEATUREWIRE_DTYPE", "FEATUREWIRE_CACHE",
              "FEATUREWIRE_AUTH_TOKEN_FILE"}
    settings = env_file(K8S / "base" / "config.env")
    assert set(settings) <= known, set(settings) - known
