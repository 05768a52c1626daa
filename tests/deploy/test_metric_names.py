"""Every metric that the Grafana dashboard, the alert rules, the HPA and the Prometheus adapter rules
query is one that service/metrics.py exports, under its exposed sample name (`_total` for counters,
`_bucket/_sum/_count` for histograms, `_info` for info), with labels it really has."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from service.metrics import Metrics
from tests.deploy.conftest import K8S

DASHBOARD = K8S / "components" / "monitoring" / "grafana-dashboard.json"
RULES = K8S / "components" / "monitoring" / "prometheusrule.yaml"
HPA = K8S / "components" / "autoscaling" / "hpa.yaml"
ADAPTER = K8S / "components" / "autoscaling" / "prometheus-adapter-rules.yaml"
METRIC = re.compile(r"\bfeaturewire_[a-z0-9_]+")
SELECTOR = re.compile(r"(featurewire_[a-z0-9_]+)\{([^}]*)\}")
# Added by Prometheus to every scraped series (pod, namespace from the ServiceMonitor's target labels).
TARGET_LABELS = {"namespace", "pod", "job", "instance", "service", "container", "endpoint"}
_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "info": ("_info",), "summary": ("", "_sum", "_count", "_created")}


def exported() -> dict[str, set[str]]:
    """Sample name → its label names, for every metric a server's registry exposes.

    Names come from every registered family (by type: a counter `x` is exposed as `x_total`); labels
    from the samples after one use of each recording method.
    """
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.observe_rpc("/featurewire.v1.Featurewire/Generate", "OK", 0.5)
    metrics.track_in_flight("/featurewire.v1.Featurewire/Generate", 1)
    metrics.observe_first_token("/featurewire.v1.Featurewire/Generate", 0.1)
    metrics.count_prompt_tokens("/featurewire.v1.Featurewire/Generate", 3)
    metrics.observe_generation(8, 0.5)
    metrics.set_queue(1, 64)
    metrics.observe_queue_wait("/featurewire.v1.Featurewire/Decompose", 2.0)
    metrics.observe_step_rows("decode", 4)
    metrics.observe_step_seconds("decode", 0.01)
    metrics.count_interventions(["set"])
    metrics.register_stack("demo", ["s0"], load_seconds=1.0)
    metrics.record_self_check("demo", True, {"s0": 0.9})
    metrics.observe_stage("demo", "s0", [4.0], [0.5])
    metrics.set_model_load_time(3.0)
    metrics.set_build_info("0", "m", "cpu", "float32")
    samples: dict[str, set[str]] = {}
    for family in registry.collect():
        for suffix in _SUFFIXES[family.type]:
            samples.setdefault(family.name + suffix, set())
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return exprs


def rule_queries() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    return [rule["expr"] for group in rules["spec"]["groups"] for rule in group["rules"]]


def adapter_queries() -> list[str]:
    return list(strings(yaml.safe_load(ADAPTER.read_text())))


@pytest.mark.parametrize("source", ["dashboard", "rules", "adapter"])
def test_queried_metrics_exist(source: str) -> None:
    queries = {"dashboard": dashboard_queries, "rules": rule_queries, "adapter": adapter_queries}[source]()
    samples = exported()
    names = {name for query in queries for name in METRIC.findall(query)}
    assert names, f"no featurewire_* metric found in the {source}"
    assert names <= set(samples), f"not exported by service/metrics.py: {sorted(names - set(samples))}"
    for query in queries:
        for name, matchers in SELECTOR.findall(query):
            used = {m.split("=")[0].split("!")[0].strip() for m in matchers.split(",") if "=" in m}
            unknown = used - samples[name] - TARGET_LABELS
            assert not unknown, f"{name} has no label {sorted(unknown)} (in {query!r})"


def test_dashboard_covers_the_serving_metrics() -> None:
    queried = {name for query in dashboard_queries() for name in METRIC.findall(query)}
    bases = {re.sub(r"_(total|bucket|sum|count|info)$", "", name) for name in queried}
    for family in ("featurewire_rpcs", "featurewire_rpc_duration_seconds", "featurewire_in_flight_requests",
                   "featurewire_queue_depth", "featurewire_time_to_first_token_seconds",
                   "featurewire_generated_tokens", "featurewire_stage_l0", "featurewire_stage_error_norm",
                   "featurewire_stack_self_check_passed", "featurewire_queue_wait_seconds", "featurewire_step_rows",
                   "featurewire_step_duration_seconds"):
        assert family in bases, f"the dashboard has no panel on {family}"
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "featurewire"


def test_scheduler_panels_split_by_their_labels_and_an_alert_watches_the_queue_wait() -> None:
    """The scheduler panels show queue wait per method and steps per phase (not one blended line), and an
    alert fires on a sustained p99 queue wait."""
    for family, label in (("featurewire_queue_wait_seconds", "method"), ("featurewire_step_rows", "phase"),
                          ("featurewire_step_duration_seconds", "phase")):
        queries = [q for q in dashboard_queries() if family in q]
        assert queries and all(re.search(rf"by \([^)]*\b{label}\b", q) for q in queries), family
    rules = yaml.safe_load(RULES.read_text())["spec"]["groups"]
    waits = [r for group in rules for r in group["rules"] if "featurewire_queue_wait_seconds_bucket" in r["expr"]]
    assert len(waits) == 1
    rule = waits[0]
    assert "histogram_quantile(0.99" in rule["expr"] and rule["for"] == "10m"
    assert re.search(r"by \([^)]*\bmethod\b", rule["expr"]) and "$labels.method" in rule["annotations"]["summary"]


def test_hpa_scales_on_exported_metrics_served_by_the_adapter() -> None:
    hpa = yaml.safe_load(HPA.read_text())
    pods_metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    served = {rule["name"]["as"] for rule in yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]}
    assert pods_metrics and set(pods_metrics) <= served
    assert set(pods_metrics) <= set(exported())  # the adapter serves them under their own names
