from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import METHOD_LABELS, Metrics, code_label, method_label, start_metrics_server


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_every_name_is_prefixed_and_exposition_parses(metrics):
    metrics.observe_rpc("/featurewire.v1.Featurewire/Decompose", grpc.StatusCode.OK, 0.2)
    metrics.set_build_info("0.1.0", "tiny-random", "cpu", "float32")
    families = list(text_string_to_metric_families(metrics.exposition().decode()))
    names = {f.name for f in families}
    assert all(name.startswith("featurewire_") for name in names)
    assert {"featurewire_rpcs", "featurewire_rpc_duration_seconds", "featurewire_stage_l0",
            "featurewire_time_to_first_token_seconds", "featurewire_build_info"} <= names
    types = {f.name: f.type for f in families}
    assert types["featurewire_rpcs"] == "counter" and types["featurewire_rpc_duration_seconds"] == "histogram"
    build = _samples(metrics)[("featurewire_build_info", (("device", "cpu"), ("dtype", "float32"),
                                                          ("model", "tiny-random"), ("version", "0.1.0")))]
    assert build == 1.0


def test_rpc_counts_and_latency(metrics):
    for code in (grpc.StatusCode.OK, grpc.StatusCode.OK, "INVALID_ARGUMENT", None):
        metrics.observe_rpc("/featurewire.v1.Featurewire/Generate", code, 0.5)
    samples = _samples(metrics)
    grpc_ = ("transport", "grpc")
    assert samples[("featurewire_rpcs_total", (("code", "OK"), ("method", "Generate"), grpc_))] == 3
    assert samples[("featurewire_rpcs_total", (("code", "INVALID_ARGUMENT"), ("method", "Generate"), grpc_))] == 1
    assert samples[("featurewire_rpc_duration_seconds_count", (("method", "Generate"), grpc_))] == 4
    assert samples[("featurewire_rpc_duration_seconds_sum", (("method", "Generate"), grpc_))] == pytest.approx(2.0)
    le = samples[("featurewire_rpc_duration_seconds_bucket", (("le", "0.5"), ("method", "Generate"), grpc_))]
    assert le == 4


def test_rpcs_are_split_by_transport(metrics):
    """The HTTP gateway's calls count under transport="http"; any other value folds into grpc."""
    metrics.observe_rpc("/featurewire.v1.Featurewire/Tokenize", "OK", 0.1, "http")
    metrics.observe_rpc("/featurewire.v1.Featurewire/Tokenize", "OK", 0.1)
    metrics.observe_rpc("/featurewire.v1.Featurewire/Tokenize", "OK", 0.1, "carrier-pigeon")
    samples = _samples(metrics)
    ok = (("code", "OK"), ("method", "Tokenize"))
    assert samples[("featurewire_rpcs_total", (*ok, ("transport", "http")))] == 1
    assert samples[("featurewire_rpcs_total", (*ok, ("transport", "grpc")))] == 2
    assert samples[("featurewire_rpc_duration_seconds_count", (("method", "Tokenize"), ("transport", "http")))] == 1


def test_labels_stay_bounded(metrics):
    assert method_label("/featurewire.v1.Featurewire/Tokenize") == "Tokenize"
    assert method_label("/grpc.health.v1.Health/Check") == "Health.Check"
    assert method_label("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo").startswith("Reflection.")
    assert method_label("Decompose") == "Decompose"
    for weird in ("/featurewire.v1.Featurewire/DropTables", "/evil.Service/Generate", "tell me a story", ""):
        assert method_label(weird) == "other"
    assert code_label("NOT_A_CODE") == "UNKNOWN" and code_label(grpc.StatusCode.CANCELLED) == "CANCELLED"
    for i in range(50):
        metrics.observe_rpc(f"/x.Y/M{i}", "OK", 0.0)
        metrics.count_interventions([f"op{i}"])
        metrics.observe_stage("some-stack", f"stage-{i}", [1, 2])
    samples = _samples(metrics)
    methods = {dict(labels).get("method") for name, labels in samples if name == "featurewire_rpcs_total"}
    assert methods == {"other"} and methods <= METHOD_LABELS
    ops = {dict(labels)["op"] for name, labels in samples if name == "featurewire_interventions_total"}
    assert ops == {"other"}
    stages = {dict(labels)["stage"] for name, labels in samples if name == "featurewire_stage_l0_count"}
    assert stages == {"other"}


def test_stage_histograms_bin_arrays(metrics):
    metrics.register_stack("demo", ["blocks.2.hook_resid_post", "blocks.4.hook_resid_post"], load_seconds=1.5)
    key = (("stack", "demo"), ("stage", "blocks.2.hook_resid_post"))
    metrics.observe_stage("demo", "blocks.2.hook_resid_post", np.array([0, 1, 3, 3, 100]),
                          error_norms=[0.2, 0.3, np.nan, 7.0])
    metrics.observe_stage("demo", "blocks.2.hook_resid_post", [5], error_norms=np.array([], dtype=np.float32))
    samples = _samples(metrics)
    bucket = lambda name, le: samples[(name + "_bucket", (("le", le), *key))]  # noqa: E731
    assert samples[("featurewire_stage_l0_count", key)] == 6
    assert samples[("featurewire_stage_l0_sum", key)] == 112
    assert bucket("featurewire_stage_l0", "0.0") == 1 and bucket("featurewire_stage_l0", "1.0") == 2
    assert bucket("featurewire_stage_l0", "4.0") == 4 and bucket("featurewire_stage_l0", "+Inf") == 6
    assert samples[("featurewire_stage_error_norm_count", key)] == 3  # NaN dropped
    assert bucket("featurewire_stage_error_norm", "0.25") == 1
    assert samples[("featurewire_stack_load_seconds", (("stack", "demo"),))] == 1.5


def test_engine_and_process_metrics(metrics):
    metrics.observe_first_token("Generate", 0.03)
    metrics.count_prompt_tokens("Generate", 12)
    metrics.observe_generation(tokens=40, seconds=2.0)
    metrics.observe_generation(tokens=0, seconds=0.0)
    metrics.count_interventions({"SET": 2, "ablate": 1})
    metrics.set_queue(3, capacity=64)
    metrics.set_model_load_time(2.5)
    metrics.record_self_check("demo", passed=False)
    metrics.track_in_flight("/featurewire.v1.Featurewire/Generate", 1)
    samples = _samples(metrics)
    assert samples[("featurewire_time_to_first_token_seconds_count", (("method", "Generate"),))] == 1
    assert samples[("featurewire_prompt_tokens_total", (("method", "Generate"),))] == 12
    assert samples[("featurewire_generated_tokens_total", ())] == 40
    assert samples[("featurewire_generation_tokens_per_second_sum", ())] == 20
    assert samples[("featurewire_interventions_total", (("op", "set"),))] == 2
    assert samples[("featurewire_queue_depth", ())] == 3 and samples[("featurewire_queue_capacity", ())] == 64
    assert samples[("featurewire_model_load_seconds", ())] == 2.5
    assert samples[("featurewire_stack_self_check_passed", (("stack", "demo"),))] == 0
    assert samples[("featurewire_in_flight_requests", (("method", "Generate"),))] == 1
    depth = [7]
    metrics.queue_depth_from(lambda: depth[0], capacity=8)
    assert _samples(metrics)[("featurewire_queue_depth", ())] == 7


def test_scheduler_metrics(metrics):
    """Both phases are exported before any step (dashboards see 0, not no data); queue waits fold unknown
    methods into `other`; rows and seconds land in their phase's buckets."""
    samples = _samples(metrics)
    for phase in ("prefill", "decode"):
        assert samples[("featurewire_step_rows_count", (("phase", phase),))] == 0
        assert samples[("featurewire_step_duration_seconds_count", (("phase", phase),))] == 0
    metrics.observe_step_rows("decode", 16)
    metrics.observe_step_rows("decode", 1)
    metrics.observe_step_seconds("decode", 0.004)
    metrics.observe_step_rows("prefill", 3)
    metrics.observe_step_seconds("prefill", 0.3)
    metrics.observe_queue_wait("/featurewire.v1.Featurewire/Decompose", 2.0)
    metrics.observe_queue_wait("Decompose", -1.0)  # clocks never run backwards here, but never below 0
    metrics.observe_queue_wait("warmup", 0.01)
    samples = _samples(metrics)
    decode = (("phase", "decode"),)
    assert samples[("featurewire_step_rows_sum", decode)] == 17
    assert samples[("featurewire_step_rows_bucket", (("le", "1.0"), *decode))] == 1
    assert samples[("featurewire_step_rows_bucket", (("le", "12.0"), *decode))] == 1
    assert samples[("featurewire_step_rows_bucket", (("le", "16.0"), *decode))] == 2
    assert samples[("featurewire_step_duration_seconds_bucket", (("le", "0.005"), *decode))] == 1
    assert samples[("featurewire_step_duration_seconds_sum", (("phase", "prefill"),))] == pytest.approx(0.3)
    assert samples[("featurewire_queue_wait_seconds_count", (("method", "Decompose"),))] == 2
    assert samples[("featurewire_queue_wait_seconds_sum", (("method", "Decompose"),))] == 2.0
    assert samples[("featurewire_queue_wait_seconds_bucket", (("le", "1.0"), ("method", "Decompose")))] == 1
    assert samples[("featurewire_queue_wait_seconds_count", (("method", "other"),))] == 1


def test_http_server_serves_metrics(metrics):
    metrics.observe_rpc("ListStacks", "OK", 0.01)
    server, thread = start_metrics_server(0, metrics.registry, addr="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as response:
            body = response.read().decode()
        assert 'featurewire_rpcs_total{code="OK",method="ListStacks",transport="grpc"} 1.0' in body
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_two_registries_do_not_collide():
    Metrics(CollectorRegistry())
    Metrics(CollectorRegistry())
    registry = CollectorRegistry()
    Metrics(registry)
    with pytest.raises(ValueError, match="Duplicated"):
        Metrics(registry)
