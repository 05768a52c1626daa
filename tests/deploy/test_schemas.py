"""Every object that k8s/ renders is valid against the Kubernetes OpenAPI schemas (offline, strict: an
unknown or misspelt field fails), for the oldest Kubernetes the manifests support and the newest the
validator knows. Custom resources are checked against minimal schemas of the fields they use."""

from __future__ import annotations

import copy
from collections.abc import Callable

import jsonschema
import kubernetes_validate
import pytest

from tests.deploy.conftest import OVERLAYS, TRAINERS, Doc

# Native gRPC probes are GA from 1.27 (and the kustomize these manifests need ships with kubectl 1.27).
MIN_KUBERNETES = "1.27.0"
VERSIONS = (MIN_KUBERNETES, kubernetes_validate.latest_version())

# Prometheus Operator CRDs (monitoring.coreos.com/v1): the fields k8s/ uses, nothing unknown allowed.
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
_SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "metadata": _METADATA,
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "additionalProperties": False,
                             "properties": {"matchLabels": _LABELS}, "required": ["matchLabels"]},
                "namespaceSelector": {"type": "object"},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["port"],
                    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                   "interval": {"type": "string", "pattern": r"^\d+[smh]$"},
                                   "scrapeTimeout": {"type": "string", "pattern": r"^\d+[smh]$"}}}},
            },
        },
    },
}
_PROMETHEUS_RULE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "metadata": _METADATA,
        "spec": {"type": "object", "additionalProperties": False, "required": ["groups"], "properties": {
            "groups": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["name", "rules"],
                "properties": {"name": {"type": "string"}, "rules": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["alert", "expr"],
                    "properties": {"alert": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9_]*$"},
                                   "expr": {"type": "string", "minLength": 1},
                                   "for": {"type": "string", "pattern": r"^\d+[smh]$"},
                                   "labels": _LABELS, "annotations": _LABELS}}}}}}}},
    },
}
CUSTOM_SCHEMAS = {"ServiceMonitor": _SERVICE_MONITOR, "PrometheusRule": _PROMETHEUS_RULE}


def validate(doc: Doc) -> None:
    if doc["kind"] in CUSTOM_SCHEMAS:
        jsonschema.validate(doc, CUSTOM_SCHEMAS[doc["kind"]])
        return
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']} is invalid for Kubernetes {version}: "
                                 f"{exc.message} at {'.'.join(map(str, exc.path))}") from None


@pytest.mark.parametrize("target", OVERLAYS + TRAINERS)
def test_every_rendered_object_is_valid(render: Callable[[str], list[Doc]], target: str) -> None:
    docs = render(target)
    assert docs, f"k8s/{target} rendered nothing"
    for doc in docs:
        validate(doc)


def test_the_validator_rejects_a_misspelt_field(render: Callable[[str], list[Doc]]) -> None:
    deployment = copy.deepcopy(next(d for d in render(OVERLAYS[0]) if d["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["grpc"]["serviceName"] = "readiness"
    with pytest.raises(AssertionError, match="serviceName"):
        validate(deployment)
    monitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "x"},
               "spec": {"selector": {"matchLabels": {}}, "endpoints": [{"port": 9090}]}}
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)


def test_overlays_and_trainer_jobs_are_all_found() -> None:
    assert {"overlays/dev-cpu", "overlays/prod-gpu"} <= set(OVERLAYS)
    assert {"trainer/single-node", "trainer/distributed"} <= set(TRAINERS)
