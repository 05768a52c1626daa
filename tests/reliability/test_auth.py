"""Bearer auth through real gRPC: every Featurewire RPC refuses a missing or wrong token with UNAUTHENTICATED
(health and reflection are exempt by default, and not when `auth_exempt_health` is off); the token, right
or wrong, never reaches the logs or the metrics; and metric label values stay a fixed set whatever method
names, metadata and request ids clients send.
"""

from __future__ import annotations

import logging
import random
import socket
import string
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import types_pb2 as t
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import CODES, INTERVENTION_OPS, METHOD_LABELS
from tests.service.conftest import Running, ServerLoop, server_config, start_server

TOKEN = "fw-Secret-7c1e9b2d4a"
WRONG = "fw-Guess-0000000000"
SERVICE = "/featurewire.v1.Featurewire/"
STAGE = "blocks.1.hook_resid_post"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def guarded(rel_loop: ServerLoop, rel_stack: Path) -> Iterator[Running]:
    """The tiny model and stack behind a bearer token, with the Prometheus endpoint on."""
    running = start_server(rel_loop, server_config(rel_stack, auth_token=TOKEN, metrics_port=_free_port(),
                                                   max_new_tokens=4))
    yield running
    running.stop()


def calls(channel: grpc.Channel) -> dict[str, Callable[[list[tuple[str, str]]], Any]]:
    """One small valid request per Featurewire RPC, sent with the given metadata; streams are drained."""

    def unary(method: str, request: Any) -> Callable[[list[tuple[str, str]]], Any]:
        stub = channel.unary_unary(SERVICE + method, request_serializer=type(request).SerializeToString)
        return lambda metadata: stub(request, metadata=metadata, timeout=30)

    def streaming(method: str, request: Any) -> Callable[[list[tuple[str, str]]], Any]:
        stub = channel.unary_stream(SERVICE + method, request_serializer=type(request).SerializeToString)
        return lambda metadata: list(stub(request, metadata=metadata, timeout=30))

    encode = channel.stream_stream(SERVICE + "EncodeActivations",
                                   request_serializer=pb.EncodeActivationsRequest.SerializeToString)
    batch = pb.EncodeActivationsRequest(stage=STAGE, activations=t.Matrix(rows=1, cols=64, values=[0.1] * 64))
    return {
        "GetServerInfo": unary("GetServerInfo", pb.GetServerInfoRequest()),
        "ListStacks": unary("ListStacks", pb.ListStacksRequest()),
        "GetFeature": unary("GetFeature", pb.GetFeatureRequest(stage=STAGE, feature=1)),
        "Tokenize": unary("Tokenize", pb.TokenizeRequest(text="hello")),
        "SearchFeatures": unary("SearchFeatures", pb.SearchFeaturesRequest(token=pb.TokenQuery(id=5))),
        "ListFeatures": unary("ListFeatures", pb.ListFeaturesRequest(stage=STAGE)),
        "Decompose": streaming("Decompose", pb.DecomposeRequest(input=t.Input(text="hello there"))),
        "Generate": streaming("Generate", pb.GenerateRequest(prompt=t.Input(text="hello"), interventions=[
            t.Intervention(stage=STAGE, feature=1, op=t.INTERVENTION_OP_ADD, value=1.0)])),
        "Score": unary("Score", pb.ScoreRequest(input=t.Input(text="hello there"))),
        "EncodeActivations": lambda metadata: list(encode(iter([batch]), metadata=metadata, timeout=30)),
    }


BAD_CREDENTIALS = {
    "none": [],
    "wrong-token": [("authorization", f"Bearer {WRONG}")],
    "token-with-suffix": [("authorization", f"Bearer {TOKEN}x")],
    "token-prefix": [("authorization", f"Bearer {TOKEN[:-1]}")],
    "no-scheme": [("authorization", TOKEN)],
    "basic-scheme": [("authorization", f"Basic {TOKEN}")],
    "empty-bearer": [("authorization", "Bearer ")],
    "other-header": [("x-api-key", TOKEN)],
}


def code_of(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("credentials", list(BAD_CREDENTIALS))
def test_every_rpc_refuses_without_the_right_token(guarded: Running, credentials: str) -> None:
    for name, call in calls(guarded.channel).items():
        code, details = code_of(lambda c=call: c(BAD_CREDENTIALS[credentials]))
        assert code == grpc.StatusCode.UNAUTHENTICATED, (name, code, details)
        assert TOKEN not in details and WRONG not in details


def test_the_right_token_is_served_and_health_is_exempt(guarded: Running) -> None:
    for scheme in ("Bearer", "bearer"):
        for name, call in calls(guarded.channel).items():
            code, details = code_of(lambda c=call, s=scheme: c([("authorization", f"{s} {TOKEN}")]))
            served = grpc.StatusCode.FAILED_PRECONDITION if name == "ListFeatures" else grpc.StatusCode.OK
            assert code == served, (name, code, details)  # the smoke stack has no dashboards to list
    assert guarded.health() == guarded.health("readiness") == "SERVING"  # no token needed for probes


def test_health_needs_the_token_when_not_exempt(rel_loop: ServerLoop) -> None:
    running = start_server(rel_loop, server_config(None, auth_token=TOKEN, auth_exempt_health=False))
    try:
        health = health_pb2_grpc.HealthStub(running.channel)
        with pytest.raises(grpc.RpcError) as refused:
            health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = health.Check(health_pb2.HealthCheckRequest(), metadata=[("authorization", f"Bearer {TOKEN}")],
                          timeout=10)
        assert ok.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop()


def _random_calls(channel: grpc.Channel, rng: random.Random, n: int) -> None:
    """Unknown methods and services, junk metadata and request ids, with and without (wrong) tokens."""
    alphabet = string.ascii_letters + string.digits
    for _ in range(n):
        word = "".join(rng.choices(alphabet, k=rng.randint(1, 24)))
        method = rng.choice([f"{SERVICE}{word}", f"/{word}.v9.X/{word}", f"/grpc.health.v1.Health/{word}",
                             f"{SERVICE}GetServerInfo", f"{SERVICE}Tokenize"])
        metadata = [(f"x-{word.lower()}", word), ("x-request-id", rng.choice([word, "../../etc", "a" * 300, "é"]))]
        if rng.random() < 0.5:
            metadata.append(("authorization", f"Bearer {rng.choice([WRONG, word, TOKEN])}"))
        stub = channel.unary_unary(method)
        code_of(lambda s=stub, m=metadata: s(b"", metadata=m, timeout=10))


def _series(exposition: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {(s.name, tuple(sorted(s.labels.items())))
            for family in text_string_to_metric_families(exposition) for s in family.samples}


def test_no_token_in_logs_or_metrics_and_labels_stay_bounded(guarded: Running,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    rng = random.Random(11)
    for credentials in BAD_CREDENTIALS.values():
        code_of(lambda c=credentials: calls(guarded.channel)["Generate"](c))
    _random_calls(guarded.channel, rng, 150)
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{guarded.server.metrics_port}/metrics", timeout=10)
    first = scrape.read().decode()
    _random_calls(guarded.channel, rng, 150)
    second = guarded.server.metrics.exposition().decode()
    logs = "\n".join(f"{r.getMessage()} {r.args}" for r in caplog.records)
    assert "rejected" in logs  # auth refusals are logged, without the token
    for secret in (TOKEN, WRONG):
        assert secret not in logs and secret not in first and secret not in second
    labels: dict[str, set[str]] = {}
    for _, pairs in _series(second):
        for key, value in pairs:
            labels.setdefault(key, set()).add(value)
    assert labels["method"] <= METHOD_LABELS and "other" in labels["method"]
    assert labels["code"] <= CODES
    assert labels.get("op", set()) <= INTERVENTION_OPS
    # the second 150 random calls added no series: cardinality does not grow with what clients send
    assert {name for name, _ in _series(second)} == {name for name, _ in _series(first)}
    assert len(_series(second)) <= len(_series(first)) + 8  # at most a few new (method, code) combinations


def test_a_request_that_does_not_parse_is_still_unauthenticated_without_a_token(guarded: Running) -> None:
    """Auth answers before the request is looked at: garbage without a token reveals nothing about parsing."""
    for method in ("GetServerInfo", "Tokenize", "Score"):
        code, _ = code_of(lambda m=method: guarded.channel.unary_unary(SERVICE + m)(b"\x0a\x02\xff\xfe", timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED, method
    code, _ = code_of(lambda: list(guarded.channel.unary_stream(SERVICE + "Decompose")(b"\xff", timeout=10)))
    assert code == grpc.StatusCode.UNAUTHENTICATED
