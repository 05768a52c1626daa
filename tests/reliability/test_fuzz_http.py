"""Property-based fuzzing of the HTTP/JSON gateway on the fuzz server process (tests/reliability/conftest.py).

The same requests as test_fuzz.py, sent as proto3 JSON (`POST /v1/<Method>`), then broken the ways a hand-written
curl call or a buggy client breaks them: a field replaced by any JSON value, unknown fields, a body that is not
JSON or not UTF-8, an array where an object belongs, unknown methods and routes, other HTTP methods, bad
timeouts and request ids. Whatever arrives, the answer is an HTTP status with a `{code, message, request_id}`
body (or an SSE stream whose last event is its status) whose code a client can act on: never INTERNAL,
UNKNOWN, UNAVAILABLE, UNIMPLEMENTED for a real RPC, DATA_LOSS or DEADLINE_EXCEEDED, and the server stays ready.

The OpenAI-compatible routes (`/openai/v1/...`) get the same treatment: completion and chat bodies with the
fuzzer's Generate requests as their `featurewire` object, OpenAI fields given any JSON value, huge `n` and
`max_tokens`, unknown models and fields, bodies that are not JSON, and streams the client drops half-way. Every
answer is OpenAI's error JSON with a client status, or a response (a stream ending with `data: [DONE]`).
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from typing import Any

import grpc
from featurewire.v1 import featurewire_pb2 as pb
from google.protobuf import json_format
from google.protobuf.message_factory import GetMessageClass
from hypothesis import given
from hypothesis import strategies as st

from tests.reliability.conftest import TRIED, ServedProcess, World
from tests.reliability.test_fuzz import (
    FUZZ,
    METHODS,
    TEXT,
    decompose_requests,
    encode_requests,
    feature_requests,
    generate_requests,
    list_requests,
    score_requests,
    search_requests,
    tokenize_requests,
)

FORBIDDEN = {"INTERNAL", "UNKNOWN", "UNAVAILABLE", "UNIMPLEMENTED", "DATA_LOSS", "DEADLINE_EXCEEDED"}
STREAMING = {"Decompose", "Generate", "EncodeActivations"}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4), max_leaves=12)


def messages(w: World, method: str) -> st.SearchStrategy[Any]:
    """The fuzzer's own request strategy for `method` (a list of messages for EncodeActivations)."""
    drawn = {"Decompose": decompose_requests(w), "Generate": generate_requests(w), "Score": score_requests(w),
             "GetFeature": feature_requests(w), "Tokenize": tokenize_requests(), "SearchFeatures": search_requests(w),
             "ListFeatures": list_requests(w), "EncodeActivations": encode_requests(w)}
    return drawn.get(method, st.just(pb_empty(method)))


def pb_empty(method: str) -> Any:
    """The empty request of a method whose fuzz strategy has none (GetServerInfo, ListStacks)."""
    return GetMessageClass(pb.DESCRIPTOR.services_by_name["Featurewire"].methods_by_name[method].input_type)()


def as_json(message: Any) -> Any:
    if isinstance(message, list):
        return [as_json(m) for m in message]
    return json_format.MessageToDict(message)


@st.composite
def bodies(draw: st.DrawFn, w: World, method: str) -> tuple[bytes, Any]:
    """A JSON request as a client would write it, often with something wrong in it; sometimes not JSON at all.
    Also the request message(s) when the body is exactly the fuzzer's message in JSON, else None."""
    kind = draw(st.sampled_from(["message", "message", "field", "unknown", "any", "bytes"]))
    if kind == "bytes":
        junk = st.sampled_from([b"", b"{", b"[]", b"\xff\xfe{}", b"null"])
        return draw(st.one_of(st.binary(max_size=64), junk)), None
    if kind == "any":
        return json.dumps(draw(JSON_VALUES)).encode(), None
    message = draw(messages(w, method))
    data = as_json(message)
    target = data[0] if isinstance(data, list) and data else data
    if kind == "field" and isinstance(target, dict) and target:
        target[draw(st.sampled_from(sorted(target)))] = draw(JSON_VALUES)
    elif kind == "unknown" and isinstance(target, dict):
        target[draw(TEXT)] = draw(JSON_VALUES)
    return json.dumps(data).encode(), message if kind == "message" else None


def grpc_code(server: ServedProcess, method: str, message: Any) -> str:
    """The code the same request gets over gRPC (streams read to the end)."""
    call = getattr(server.stub, method)
    try:
        result = call(iter(message) if isinstance(message, list) else message, timeout=120)
        if not hasattr(result, "ListFields"):
            list(result)
    except grpc.RpcError as exc:
        return exc.code().name
    return "OK"


def send(server: ServedProcess, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    """(HTTP status, the gRPC code name the gateway reported) of one request, the SSE stream read to its end."""
    connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=120)
    try:
        connection.request(method, path, body=body, headers={"content-type": "application/json", **headers})
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    if response.status == 200 and response.getheader("content-type", "").startswith("text/event-stream"):
        blocks = [b for b in raw.decode().split("\n\n") if b.strip()]
        last = dict(line.split(": ", 1) for line in blocks[-1].splitlines())
        assert last.get("event") == "status", f"the stream did not end with its status: {blocks[-1]!r}"
        return 200, json.loads(last["data"])["code"]
    if response.status == 200:
        json.loads(raw)  # a unary answer is JSON
        return 200, "OK"
    error = json.loads(raw)
    assert set(error) == {"code", "message", "request_id"} and error["message"], error
    return response.status, error["code"]


@FUZZ
@given(data=st.data())
def test_the_gateway_answers_every_body_with_a_client_status(fuzz_server: ServedProcess, world: World,
                                                             data: st.DataObject) -> None:
    method = data.draw(st.sampled_from(METHODS), label="method")
    body, message = data.draw(bodies(world, method), label="body")
    query = data.draw(st.sampled_from([""] * 12 + ["?timeout=30", "?timeout=0", "?timeout=-1", "?timeout=1e400",
                                                   "?timeout=nan", "?timeout=%00"]), label="query")
    odd_headers = st.dictionaries(st.sampled_from(["grpc-timeout", "x-request-id", "authorization"]),
                                  st.sampled_from(["5S", "0m", "99999999H", "x", "Bearer x", "a" * 300, "é"]),
                                  min_size=1, max_size=2)
    headers = data.draw(st.one_of(st.just({}), odd_headers) if data.draw(st.integers(0, 5)) == 0 else st.just({}),
                        label="headers")
    status, code = send(fuzz_server, "POST", f"/v1/{method}{query}", body, headers)
    TRIED[(f"HTTP {method}", code)] += 1
    assert code not in FORBIDDEN, f"POST /v1/{method}{query} answered {status} {code}"
    assert status < 500 or code == "RESOURCE_EXHAUSTED"
    if message is not None and not query and not headers:  # the same request, unchanged: the same answer
        assert code == grpc_code(fuzz_server, method, message), f"{method} differs over gRPC"


OPENAI_ROUTES = ("/openai/v1/completions", "/openai/v1/chat/completions")
OPENAI_FIELDS = ("model", "prompt", "messages", "n", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                 "seed", "stop", "stream", "stream_options", "logprobs", "top_logprobs", "echo", "user",
                 "frequency_penalty", "logit_bias", "best_of", "featurewire")


@st.composite
def openai_bodies(draw: st.DrawFn, w: World, route: str) -> bytes:
    """A completion or chat body as an SDK would send it, with the fuzzer's Generate request as its featurewire
    object, and often something wrong in it."""
    kind = draw(st.sampled_from(["body"] * 5 + ["field", "unknown", "any", "bytes"]))
    if kind == "bytes":
        return draw(st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"{", b"[]", b"\xff{}", b"null"])))
    if kind == "any":
        return json.dumps(draw(JSON_VALUES)).encode()
    model = draw(st.sampled_from(["tiny-random"] * 3 + [f"tiny-random:{w.stack}"] * 3 + ["gpt-4o", "", "x:nope"]))
    body: dict[str, Any] = {"model": model, "max_tokens": draw(st.sampled_from([1, 3, 6, 6, 6, 7, 10**9])),
                            "stream": draw(st.booleans())}
    if route.endswith("/chat/completions"):
        body["messages"] = [{"role": draw(st.sampled_from(["user", "system", "tool"])), "content": draw(TEXT)}]
    else:
        body["prompt"] = draw(st.one_of(TEXT, st.lists(TEXT, min_size=1, max_size=3),
                                        st.lists(st.integers(-1, w.vocab + 5), min_size=1, max_size=8)))
    for name, values in (("n", st.sampled_from([1, 2, 16, 17, 10**6])), ("temperature", st.floats(-1, 3)),
                         ("seed", st.integers(-5, 2**64)), ("logprobs", st.sampled_from([0, 1, True])),
                         ("stop", st.one_of(TEXT, st.lists(TEXT, max_size=3))), ("echo", st.booleans()),
                         ("stream_options", st.just({"include_usage": True}))):
        if draw(st.integers(0, 4)) == 0:
            body[name] = draw(values)
    if draw(st.booleans()):
        steering = json_format.MessageToDict(draw(generate_requests(w)))
        steering.pop("prompt", None)
        steering.pop("sampling", None)
        if steering.pop("withDefault", False):
            steering["default_branch"] = True
        body["featurewire"] = steering
    if kind == "field":
        body[draw(st.sampled_from(OPENAI_FIELDS))] = draw(JSON_VALUES)
    elif kind == "unknown":
        body[draw(TEXT)] = draw(JSON_VALUES)
    return json.dumps(body).encode()


def send_openai(server: ServedProcess, path: str, body: bytes) -> tuple[int, str]:
    """(HTTP status, the error code or "ok") of one OpenAI request, a stream read to its `[DONE]`."""
    connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=120)
    try:
        connection.request("POST", path, body=body, headers={"content-type": "application/json"})
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    if response.status == 200 and response.getheader("content-type", "").startswith("text/event-stream"):
        data = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
        assert data and data[-1] == "[DONE]", f"the stream did not end with [DONE]: {raw[-200:]!r}"
        errors = [json.loads(d)["error"] for d in data[:-1] if "error" in json.loads(d)]
        return 200, errors[0]["code"] if errors else "ok"
    answer = json.loads(raw)
    if response.status == 200:
        assert answer["choices"], answer
        return 200, "ok"
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], answer
    return response.status, error["code"]


@FUZZ
@given(data=st.data())
def test_the_openai_routes_answer_every_body_with_a_client_status(fuzz_server: ServedProcess, world: World,
                                                                  data: st.DataObject) -> None:
    route = data.draw(st.sampled_from(OPENAI_ROUTES), label="route")
    body = data.draw(openai_bodies(world, route), label="body")
    status, code = send_openai(fuzz_server, route, body)
    TRIED[(f"OpenAI {route.removeprefix('/openai/v1/')}", code)] += 1
    assert code.upper() not in FORBIDDEN, f"POST {route} answered {status} {code}"
    assert status < 500 or code == "resource_exhausted"


@FUZZ
@given(data=st.data())
def test_a_dropped_openai_stream_leaves_the_server_serving(fuzz_server: ServedProcess, world: World,
                                                           data: st.DataObject) -> None:
    """Broken streams: the client goes away after some bytes of a streamed answer (or before any)."""
    body = json.dumps({"model": "tiny-random", "prompt": data.draw(TEXT.filter(bool), label="prompt"),
                       "n": data.draw(st.integers(1, 4), label="n"), "max_tokens": 6, "stream": True,
                       "featurewire": {"ignore_eos": True}}).encode()
    keep = data.draw(st.integers(0, 400), label="bytes read")
    sock = socket.create_connection(("127.0.0.1", fuzz_server.server.http_port), timeout=60)
    try:
        sock.sendall(b"POST /openai/v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        while len(received) < keep and (chunk := sock.recv(min(4096, keep - len(received)))):
            received += chunk
    finally:
        sock.close()
    TRIED[("OpenAI dropped stream", "ok")] += 1
    assert send_openai(fuzz_server, "/openai/v1/completions",
                       json.dumps({"model": "tiny-random", "prompt": "x", "max_tokens": 1}).encode()) == (200, "ok")


@given(path=st.one_of(st.sampled_from(["/v1/", "/v1/Nope", "/v1/Decompose/x", "/static/../pages.py", "/static/",
                                      "/v2/Decompose", "/%2e%2e/", "/static/js/../../index.html",
                                      "/openai/v1/", "/openai/v1/nope", "/openai/v1/models/nope",
                                      "/openai/v2/completions", "/openai/v1/completions/x", "/openai/"]),
                      TEXT.map(lambda text: "/" + text)),
       method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"]))
@FUZZ
def test_routes_that_do_not_exist_are_404_or_405(fuzz_server: ServedProcess, path: str, method: str) -> None:
    path = urllib.parse.quote(path, safe="/%.")
    connection = http.client.HTTPConnection("127.0.0.1", fuzz_server.server.http_port, timeout=60)
    try:
        connection.request(method, path, body=b"{}")
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    TRIED[(f"HTTP {method} route", str(response.status))] += 1
    assert response.status < 500, f"{method} {path} answered {response.status}"
    assert b"class ExplorerFiles" not in body, "a path outside the explorer's files was served"


def test_the_server_is_still_ready(fuzz_server: ServedProcess) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", fuzz_server.server.http_port, timeout=60)
    connection.request("GET", "/readyz")
    assert connection.getresponse().status == 200
    assert fuzz_server.health() == "SERVING"

