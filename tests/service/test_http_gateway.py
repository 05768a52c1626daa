"""The HTTP/JSON gateway against a real in-process server (tiny model, smoke stack): every RPC answers what
gRPC answers for the same request, streams are SSE ending with a status event, errors map to their HTTP
status, auth and request ids travel, a dropped connection frees the engine, health routes follow the health
states through drain and stop, and the metrics count the gateway's calls under transport="http"."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import types_pb2 as t
from google.protobuf import json_format, struct_pb2
from google.protobuf.internal import type_checkers

from service.cli import _server_config, build_parser
from service.config import ServerConfig
from service.http.codes import HTTP_STATUS, MAX_TIMEOUT_S, BadTimeout, http_status, parse_timeout
from service.http.gateway import service_rpcs
from service.http.jsonmap import message_to_dict, shortest_floats
from tests.server_process import launch
from tests.service.conftest import Running, ServerLoop, server_config, slow_generation, start_server
from tests.service.onnx_stacks import captured, encode_requests
from tests.service.test_activation_only import onnx_stack, start_activation_server  # noqa: F401 (a fixture)
from tests.service.test_server import _self_signed

STAGE0, STAGE1 = "blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"
TOKEN = "gateway-token"
Event = tuple[str, Any]  # (event name, parsed data); "message" for a plain `data:` event


# -- an HTTP client on the standard library ------------------------------------------------------------
def _connection(running: Running, timeout: float = 60.0, context: ssl.SSLContext | None = None
                ) -> http.client.HTTPConnection:
    port = running.server.http_port
    assert port
    if context is not None:
        return http.client.HTTPSConnection("localhost", port, timeout=timeout, context=context)
    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)


def request(running: Running, path: str, body: Any = None, *, method: str = "POST",
            headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None
            ) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body) of one request; a dict or list body is sent as JSON."""
    data = json.dumps(body).encode() if isinstance(body, dict | list) else body
    connection = _connection(running, context=context)
    try:
        connection.request(method, path, body=data, headers={"content-type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def events(raw: bytes) -> list[Event]:
    """Server-sent events of a whole body, data parsed as JSON."""
    parsed = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        parsed.append((fields.get("event", "message"), json.loads(fields["data"])))
    return parsed


def post(running: Running, method: str, body: Any = None, **kwargs: Any) -> tuple[int, dict[str, str], Any]:
    status, headers, raw = request(running, f"/v1/{method}", body, **kwargs)
    if headers.get("content-type", "").startswith("text/event-stream"):
        return status, headers, events(raw)
    return status, headers, json.loads(raw)


def grpc_outcome(running: Running, method: str, body: dict[str, Any], metadata: tuple = ()) -> tuple[int, Any]:
    """What a gRPC client gets for the same JSON request: (HTTP status it maps to, JSON or [JSON per message])."""
    rpc = service_rpcs()[method]
    message = json_format.ParseDict(body, rpc.request_type())
    stub = getattr(running.stub, method)
    try:
        if rpc.client_streaming:
            return 200, [json_format.MessageToDict(m) for m in stub(iter([message]), timeout=60, metadata=metadata)]
        if rpc.server_streaming:
            return 200, [json_format.MessageToDict(m) for m in stub(message, timeout=60, metadata=metadata)]
        return 200, json_format.MessageToDict(stub(message, timeout=60, metadata=metadata))
    except grpc.RpcError as error:
        return http_status(error.code()), {"code": error.code().name, "message": error.details()}


# -- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gateway(server_loop: ServerLoop, tiny_stack: Path) -> Iterator[Running]:
    running = start_server(server_loop, server_config(tiny_stack, http_port=0, queue_size=4))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def secured(server_loop: ServerLoop, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, Path]]:
    """HTTPS + bearer token (the gateway then calls a plaintext loopback-only port of the same server)."""
    cert, key = _self_signed(tmp_path_factory.mktemp("gateway-tls"))
    running = start_server(server_loop, server_config(None, http_port=0, auth_token=TOKEN, tls_cert=cert,
                                                      tls_key=key),
                           credentials=grpc.ssl_channel_credentials(cert.read_bytes()), host_override="localhost")
    yield running, cert
    running.stop()


# -- every RPC equals its gRPC answer ----------------------------------------------------------------------
UNARY_BODIES: dict[str, dict[str, Any]] = {
    "GetServerInfo": {},
    "ListStacks": {},
    "Tokenize": {"text": "The quick brown fox"},
    "GetFeature": {"stage": STAGE0, "feature": 3, "topN": 4},
    "Score": {"input": {"text": "The quick brown fox jumps"},
              "interventions": [{"stage": STAGE0, "feature": 1, "op": "INTERVENTION_OP_ADD", "value": 2.0}]},
    "SearchFeatures": {"text": {"text": "The quick brown fox"}, "pageSize": 5},
    "ListFeatures": {"stage": STAGE0, "pageSize": 5},
}


@pytest.mark.parametrize("method", [m for m, rpc in service_rpcs().items() if not rpc.server_streaming])
def test_every_unary_rpc_answers_what_grpc_answers(gateway: Running, method: str) -> None:
    """Same JSON as MessageToDict of the gRPC response, or the same code and message with its HTTP status.

    Every unary RPC of the descriptor is exercised (a new one with the empty request until it gets a body here).
    """
    body = UNARY_BODIES.get(method, {})
    status, headers, answer = post(gateway, method, body)
    expected_status, expected = grpc_outcome(gateway, method, body)
    assert status == expected_status, answer
    if status == 200:
        assert headers["content-type"] == "application/json" and answer == expected
    else:
        assert {k: answer[k] for k in ("code", "message")} == expected
    assert len(headers["x-request-id"]) == 32


def test_the_common_unary_rpcs_succeed(gateway: Running) -> None:
    for method in ("GetServerInfo", "ListStacks", "Tokenize", "GetFeature", "Score"):
        status, _, answer = post(gateway, method, UNARY_BODIES[method])
        assert status == 200, (method, answer)
    _, _, info = post(gateway, "GetServerInfo")
    assert info["model"]["name"] == "tiny-random" and info["model"]["dModel"] == 64  # lowerCamelCase names
    _, _, tokens = post(gateway, "Tokenize", {"text": "hello", "add_special_tokens": False})  # proto names too
    assert tokens["ids"] and len(tokens["ids"]) == len(tokens["tokens"])


@pytest.mark.parametrize("method, body", [
    ("Decompose", {"input": {"text": "The quick brown fox jumps over the lazy dog"},
                   "options": {"topK": 4, "includeError": True}, "chunkTokens": 3}),
    ("Generate", {"prompt": {"text": "The quick brown fox"}, "sampling": {"maxNewTokens": 8, "ignoreEos": True,
                                                                          "seed": "7"},
                  "decompose": {"topK": 2}, "withDefault": True,
                  "interventions": [{"stage": STAGE0, "feature": 1, "op": "INTERVENTION_OP_SET", "value": 5.0}]}),
])
def test_streams_are_sse_equal_to_the_grpc_stream(gateway: Running, method: str, body: dict[str, Any]) -> None:
    status, headers, stream = post(gateway, method, body, headers={"x-request-id": "sse-1"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert headers["x-request-id"] == "sse-1"
    *messages, (name, final) = stream
    assert name == "status" and final == {"code": "OK", "message": "", "request_id": "sse-1"}
    assert all(kind == "message" for kind, _ in messages)
    _, expected = grpc_outcome(gateway, method, body)
    assert [data for _, data in messages] == expected and len(expected) > 2


def test_encode_activations_takes_an_array_and_streams_one_response_per_request(gateway: Running) -> None:
    batches = [{"sequence": str(i), "stage": STAGE0, "topK": 4,
                "activations": {"rows": 2, "cols": 64, "values": [((i + j) % 7) / 7 - 0.4 for j in range(128)]}}
               for i in range(3)]
    status, _, stream = post(gateway, "EncodeActivations", batches)
    assert status == 200 and stream[-1] == ("status", {"code": "OK", "message": "", "request_id": stream[-1][1][
        "request_id"]})
    responses = [data for _, data in stream[:-1]]
    rpc = service_rpcs()["EncodeActivations"]
    grpc_responses = gateway.stub.EncodeActivations(iter([json_format.ParseDict(b, rpc.request_type())
                                                          for b in batches]), timeout=60)
    assert responses == [json_format.MessageToDict(m) for m in grpc_responses]
    assert [r.get("sequence", "0") for r in responses] == ["0", "1", "2"]
    status, _, single = post(gateway, "EncodeActivations", batches[1])  # one object is one request
    assert status == 200 and [data for _, data in single[:-1]] == responses[1:2]
    status, _, error = post(gateway, "EncodeActivations", [batches[0], {**batches[1], "stage": "nope"}])
    assert status == 200 and error[0][1] == responses[0]  # an error after a response ends the stream
    assert error[-1][0] == "status" and error[-1][1]["code"] == "NOT_FOUND"


# -- errors -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, body, status, code, fragment", [
    ("Decompose", {"input": {"text": "x"}, "options": {"stages": ["no.such.stage"]}}, 404, "NOT_FOUND", "no.such"),
    ("Decompose", {"input": {"text": "x"}, "options": {"topK": 100000}}, 400, "INVALID_ARGUMENT", "top_k"),
    ("Generate", {"prompt": {"text": "x"}, "sampling": {"maxNewTokens": 100000}}, 400, "INVALID_ARGUMENT",
     "max_new_tokens"),
    ("Tokenize", b'{"text": "unterminated', 400, "INVALID_ARGUMENT", "not valid JSON"),
    ("Tokenize", b"\xff\xfe", 400, "INVALID_ARGUMENT", "not valid JSON"),
    ("Tokenize", {"txet": "typo"}, 400, "INVALID_ARGUMENT", "txet"),
    ("Tokenize", [{"text": "a"}], 400, "INVALID_ARGUMENT", "must be a JSON object"),
    ("Generate", {"prompt": {"text": "x"}, "sampling": {"maxNewTokens": "many"}}, 400, "INVALID_ARGUMENT",
     "maxNewTokens"),
    ("NoSuchMethod", {}, 404, "NOT_FOUND", "no RPC named"),
])
def test_errors_get_their_http_status_and_body(gateway: Running, method: str, body: Any, status: int, code: str,
                                               fragment: str) -> None:
    got, headers, raw = request(gateway, f"/v1/{method}", body, headers={"x-request-id": "err-1"})
    answer = json.loads(raw)
    assert (got, answer["code"], answer["request_id"], headers["x-request-id"]) == (status, code, "err-1", "err-1")
    assert fragment in answer["message"] and headers["content-type"] == "application/json"


def test_routing_errors_and_timeouts(gateway: Running) -> None:
    status, headers, raw = request(gateway, "/v1/Tokenize", method="GET")
    assert status == 405 and json.loads(raw)["code"] == "UNIMPLEMENTED" and "POST" in headers["allow"]
    status, _, raw = request(gateway, "/nowhere", {})
    assert status == 404 and json.loads(raw)["code"] == "NOT_FOUND"
    status, _, raw = request(gateway, "/v1/Tokenize?timeout=soon", {"text": "x"})
    assert status == 400 and "timeout" in json.loads(raw)["message"]
    status, _, raw = request(gateway, "/v1/Tokenize?timeout=30", {"text": "x"}, headers={"grpc-timeout": "5S"})
    assert status == 200
    status, _, raw = request(gateway, "/v1/Tokenize", {"text": "x"}, headers={"grpc-timeout": "99999999H"})
    assert status == 200  # the longest deadline gRPC's form can say (the long fuzz run found it answered 504)


def test_a_deadline_ends_a_stream_with_its_status(gateway: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    slow_generation(monkeypatch, 0.05)
    body = {"prompt": {"text": "slow"}, "sampling": {"maxNewTokens": 100, "ignoreEos": True}}
    status, _, stream = post(gateway, "Generate", body, headers={"grpc-timeout": "600m"})
    assert status == 200 and 1 <= len(stream) - 1 < 50
    assert stream[-1][0] == "status" and stream[-1][1]["code"] == "DEADLINE_EXCEEDED"


def test_auth_over_https(secured: tuple[Running, Path]) -> None:
    running, cert = secured
    context = ssl.create_default_context(cafile=str(cert))
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {TOKEN}"}):
        status, response_headers, raw = request(running, "/v1/Tokenize", {"text": "x"}, headers=headers,
                                                context=context)
        answer = json.loads(raw)
        assert (status, answer["code"]) == (401, "UNAUTHENTICATED") and TOKEN not in answer["message"]
        assert response_headers["www-authenticate"] == "Bearer"
    status, _, raw = request(running, "/v1/Tokenize", {"text": "x"}, headers={"authorization": f"Bearer {TOKEN}"},
                             context=context)
    assert status == 200 and json.loads(raw)["ids"]
    status, _, raw = request(running, "/readyz", method="GET", context=context)  # health is exempt, as in gRPC
    assert status == 200 and json.loads(raw)["status"] == "SERVING"
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        request(running, "/healthz", method="GET")  # plain HTTP on the HTTPS port


# -- cancellation, health, drain, metrics ----------------------------------------------------------------
def test_a_dropped_connection_cancels_the_generation(gateway: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    record = slow_generation(monkeypatch, 0.05)
    body = json.dumps({"prompt": {"text": "never read"}, "sampling": {"maxNewTokens": 300, "ignoreEos": True}})
    sock = socket.create_connection(("127.0.0.1", gateway.server.http_port), timeout=30)
    sock.sendall(f"POST /v1/Generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 f"content-length: {len(body)}\r\n\r\n{body}".encode())
    received = b""
    while b"data: " not in received:  # the stream has started
        chunk = sock.recv(65536)
        assert chunk, "the connection closed before the first event"
        received += chunk
    sock.close()
    assert record["closed"].wait(10), "the generation kept running after the client went away"
    assert record["events"] < 100
    deadline = time.monotonic() + 10
    while gateway.server.engine.busy or gateway.server.engine.queue_depth:
        assert time.monotonic() < deadline, "the engine stayed busy"
        time.sleep(0.01)
    assert post(gateway, "Tokenize", {"text": "still serving"})[0] == 200


def test_health_routes_follow_ready_draining_and_stopped(server_loop: ServerLoop) -> None:
    running = start_server(server_loop, server_config(None, http_port=0, drain_grace_s=1.0))
    try:
        assert [request(running, path, method="GET")[0] for path in ("/healthz", "/readyz")] == [200, 200]
        server_loop.run(running.server.drain())
        status, _, raw = request(running, "/readyz", method="GET")
        assert (status, json.loads(raw)) == (503, {"service": "readiness", "status": "NOT_SERVING"})
        assert request(running, "/healthz", method="GET")[0] == 200
        status, _, answer = post(running, "Tokenize", {"text": "x"})
        assert (status, answer["code"]) == (503, "UNAVAILABLE") and "shutting down" in answer["message"]
        port = running.server.http_port
    finally:
        running.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_the_serve_command_with_http_port_serves_and_drains_on_sigterm() -> None:
    """`featurewire-serve serve --http-port 0`: the port is logged, requests work, SIGTERM still exits 0."""
    server = launch(["--model", "tiny-random", "--device", "cpu", "--host", "127.0.0.1", "--port", "0",
                     "--metrics-port", "0", "--http-port", "0", "--drain-grace", "5"], timeout=120)
    try:
        match = re.search(r"HTTP/JSON gateway on http://127\.0\.0\.1:(\d+)", server.log)
        assert match is not None, server.log
        connection = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=30)
        connection.request("POST", "/v1/Tokenize", body=b'{"text": "hello"}')
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["ids"]
        connection.close()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) == 0
        if server.reader is not None:
            server.reader.join(10)
    finally:
        server.stop()
    assert "featurewire stopped" in server.log


def test_gateway_calls_count_under_transport_http(gateway: Running) -> None:
    post(gateway, "ListStacks", {})
    gateway.stub.ListStacks(pb.ListStacksRequest(), timeout=10)
    post(gateway, "Decompose", {"input": {"text": "x"}, "options": {"stages": ["nope"]}})
    registry = gateway.server.metrics.registry

    def count(method: str, code: str, transport: str) -> float:
        labels = {"method": method, "code": code, "transport": transport}
        return registry.get_sample_value("featurewire_rpcs_total", labels) or 0.0

    assert count("ListStacks", "OK", "http") >= 1 and count("ListStacks", "OK", "grpc") >= 1
    assert count("Decompose", "NOT_FOUND", "http") >= 1
    assert (registry.get_sample_value("featurewire_rpc_duration_seconds_count",
                                      {"method": "ListStacks", "transport": "http"}) or 0) >= 1


def test_the_activation_only_server_has_the_gateway(server_loop: ServerLoop, onnx_stack: Path,  # noqa: F811
                                                    tiny_gemma: Any) -> None:
    """`serve --no-model` shares the lifecycle, so the gateway too, and still imports no torch."""
    running = start_activation_server(server_loop, server_config(onnx_stack, http_port=0))
    try:
        status, _, info = post(running, "GetServerInfo")
        assert status == 200 and info["capabilities"]["mode"] == "SERVING_MODE_ACTIVATION_ONLY"
        batches = [json_format.MessageToDict(r) for r in encode_requests(captured(tiny_gemma))]
        status, _, stream = post(running, "EncodeActivations", batches)
        assert status == 200 and len(stream) == len(batches) + 1 and stream[-1][1]["code"] == "OK"
        expected = running.stub.EncodeActivations(iter(encode_requests(captured(tiny_gemma))), timeout=60)
        assert [data for _, data in stream[:-1]] == [json_format.MessageToDict(m) for m in expected]
        status, _, answer = post(running, "Decompose", {"input": {"text": "x"}})
        assert (status, answer["code"]) == (501, "UNIMPLEMENTED") and "host model" in answer["message"]
    finally:
        running.stop()
    code = ("import json, sys; import service.activation_server, service.http.gateway; "
            "print(json.dumps(sorted(m for m in ('torch', 'transformers') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                         text=True, check=True)
    assert json.loads(out.stdout) == []


# -- the pieces without a server -------------------------------------------------------------------------
def test_the_status_table_is_grpc_gateways() -> None:
    assert set(HTTP_STATUS) == set(grpc.StatusCode)
    expected = {"OK": 200, "INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "UNAUTHENTICATED": 401,
                "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429, "FAILED_PRECONDITION": 400,
                "UNIMPLEMENTED": 501, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "CANCELLED": 499,
                "INTERNAL": 500, "UNKNOWN": 500, "ALREADY_EXISTS": 409, "ABORTED": 409, "OUT_OF_RANGE": 400,
                "DATA_LOSS": 500}
    assert {code.name: http_status(code) for code in grpc.StatusCode} == expected


def test_timeouts_parse_from_the_query_or_grpc_timeout() -> None:
    assert parse_timeout(None, None) is None
    assert parse_timeout("30S", None) == 30 and parse_timeout("500m", None) == 0.5 and parse_timeout("2M", None) == 120
    assert parse_timeout("1.5", None) == 1.5 and parse_timeout("5S", "2") == 2
    assert parse_timeout("99999999H", None) == parse_timeout(None, "1e300") == MAX_TIMEOUT_S  # no clock overflow
    for header, query in (("0S", None), ("-1", None), ("soon", None), (None, "0"), (None, "inf"), (None, "nan")):
        with pytest.raises(BadTimeout):
            parse_timeout(header, query)


def test_the_http_port_flag_and_variable() -> None:
    assert ServerConfig().http_port is None and ServerConfig.from_env({}).http_port is None
    assert ServerConfig.from_env({"FEATUREWIRE_HTTP_PORT": "8080"}).http_port == 8080
    assert ServerConfig.from_env({"FEATUREWIRE_HTTP_PORT": ""}).http_port is None
    args = build_parser().parse_args(["serve", "--http-port", "0"])
    assert _server_config(args).http_port == 0
    with pytest.raises(ValueError, match=r"FEATUREWIRE_HTTP_PORT: http_port must be in \[0, 65535\]"):
        ServerConfig.from_env({"FEATUREWIRE_HTTP_PORT": "70000"})
    with pytest.raises(ValueError, match="FEATUREWIRE_HTTP_PORT must be an integer"):
        ServerConfig.from_env({"FEATUREWIRE_HTTP_PORT": "web"})
    with pytest.raises(ValueError, match="http_port must differ"):
        ServerConfig(port=8080, http_port=8080)


def _reference_float(value: float) -> Any:
    """How json_format writes one float32 field value."""
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    return type_checkers.ToShortestFloat(value)


def test_shortest_floats_are_protobufs_value_for_value() -> None:
    rng = np.random.default_rng(0)
    with np.errstate(invalid="ignore"):
        any_bits = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    typical = (rng.standard_normal(20000) * rng.choice([1e-3, 1.0, 30.0, 1e4], 20000)).astype(np.float32)
    edges = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 1e-45, -1e-45, 1.1754944e-38, 3.4028235e38, 0.5, 1.5, 2.5,
                      1e-5, 0.1, 1.0, 10.0, 100.0, 1e10, 9.999999e9, 123456.5, 1e-14, 9.99e-15, 1e27, 1e28,
                      16777216.0, 0.30000001],
                     dtype=np.float32)
    for array in (any_bits, typical, edges):
        with np.errstate(invalid="ignore"):  # signalling NaN bit patterns
            values = array.astype(np.float64).tolist()
        expected = [_reference_float(v) for v in values]
        assert [repr(v) for v in shortest_floats(values)] == [repr(v) for v in expected]  # -0.0 is not 0.0


def test_message_to_dict_equals_json_format(gateway: Running) -> None:
    nan, inf = float("nan"), float("inf")
    messages = [
        gateway.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10),  # maps of doubles, uint64, enums
        t.StageCodes(stage=1, ids=[3, 1, 2], values=[0.1, -2.5, 1e-45, nan, -inf], l0=9, error_norm=0.30000001),
        t.StageCodes(ids=[], values=[], predicted_error_norm=0.0),
        t.Matrix(rows=1, cols=2, raw=b"\x00\x01\xff", dtype=1),
        t.Matrix(rows=1, cols=2, values=[1.0, 16777216.0], dtype=99),  # an enum number with no name
        pb.DecomposeResponse(chunk=pb.DecomposeChunk()),  # an empty sub-message is still {}
        struct_pb2.Struct(fields={"a": struct_pb2.Value(number_value=1.5)}),  # a well-known type
    ]
    for message in messages:
        assert str(message_to_dict(message)) == str(json_format.MessageToDict(message)), type(message).__name__
