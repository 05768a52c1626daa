"""The interceptor chain on a real grpc.aio server (port 0) with tiny bytes-in/bytes-out handlers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from core import errors
from service.config import ServerConfig
from service.health import Health
from service.interceptors import REQUEST_ID_KEY, build_interceptors, current_request_id
from service.metrics import SERVICE, Metrics

TOKEN = "s3cr3t-T0ken"


async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    if request == b"abort":
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such stack 'x'")
    if request == b"boom":
        raise KeyError("secret internals")
    if request == b"invalid":
        raise errors.InvalidRequest("top_k must be in [1, 256]")
    if request == b"setcode":
        context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
        context.set_details("not now")
        return b""
    if request == b"slow":
        await asyncio.sleep(10)
    return current_request_id().encode() if request == b"rid" else request


async def stream(request: bytes, context: grpc.aio.ServicerContext):
    for i in range(3):
        yield b"chunk%d" % i
        if request == b"slow":
            await asyncio.sleep(10)
        if request == b"abort":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")


async def writer(request: bytes, context: grpc.aio.ServicerContext) -> None:
    await context.write(b"first")
    await context.write(b"second")


async def bidi(requests, context: grpc.aio.ServicerContext):
    async for request in requests:
        yield request.upper()


def sync_unary(request: bytes, context) -> bytes:
    return b"sync:" + request


HANDLERS = {
    "GetServerInfo": grpc.unary_unary_rpc_method_handler(unary),
    "Decompose": grpc.unary_stream_rpc_method_handler(stream),
    "Generate": grpc.unary_stream_rpc_method_handler(writer),
    "EncodeActivations": grpc.stream_stream_rpc_method_handler(bidi),
    "Tokenize": grpc.unary_unary_rpc_method_handler(sync_unary),
}


class Harness:
    def __init__(self, channel: grpc.aio.Channel, metrics: Metrics) -> None:
        self.channel, self.metrics = channel, metrics

    def unary(self, method: str = "GetServerInfo"):
        return self.channel.unary_unary(f"/{SERVICE}/{method}")

    def stream(self, method: str = "Decompose"):
        return self.channel.unary_stream(f"/{SERVICE}/{method}")

    def count(self, method: str, code: str) -> float:
        value = self.metrics.registry.get_sample_value("featurewire_rpcs_total",
                                                       {"method": method, "code": code, "transport": "grpc"})
        return value or 0.0

    async def wait_count(self, method: str, code: str, expected: float) -> None:
        deadline = time.monotonic() + 5
        while self.count(method, code) < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert self.count(method, code) == expected


def run(body: Callable[[Harness], Awaitable[None]], **config: object) -> None:
    async def main() -> None:
        metrics = Metrics(CollectorRegistry())
        server = grpc.aio.server(interceptors=build_interceptors(ServerConfig(**config), metrics))  # type: ignore[arg-type]
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, HANDLERS)])
        health = Health()
        health.register(server)
        await health.set_ready()
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await body(Harness(channel, metrics))
        finally:
            await server.stop(None)

    asyncio.run(main())


async def _error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


# -- auth -------------------------------------------------------------------------------------------


def test_auth_rejects_missing_and_wrong_tokens_and_never_logs_them(caplog):
    caplog.set_level(logging.DEBUG)
    bearer = (("authorization", f"Bearer {TOKEN}"),)

    async def body(h: Harness) -> None:
        error = await _error(h.unary()(b"hi", timeout=5))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in error.details()
        error = await _error(h.unary()(b"hi", metadata=(("authorization", "Bearer guess-G0es-here"),), timeout=5))
        assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
        error = await _error(h.unary()(b"hi", metadata=(("authorization", f"Basic {TOKEN}"),), timeout=5))
        assert "unsupported authorization scheme" in error.details()
        assert await h.unary()(b"hi", metadata=bearer, timeout=5) == b"hi"
        assert await h.unary()(b"hi", metadata=(("authorization", f"bearer  {TOKEN} "),), timeout=5) == b"hi"
        # every handler shape is guarded, sync ones included
        error = await _error(h.stream()(b"ok", timeout=5).read())
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        error = await _error(h.unary("Tokenize")(b"x", timeout=5))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert await h.unary("Tokenize")(b"x", metadata=bearer, timeout=5) == b"sync:x"
        bidi_call = h.channel.stream_stream(f"/{SERVICE}/EncodeActivations")(iter([b"a"]), timeout=5)
        error = await _error(bidi_call.read())
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        # health probes carry no token
        health = health_pb2_grpc.HealthStub(h.channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        await h.wait_count("GetServerInfo", "UNAUTHENTICATED", 3)

    run(body, auth_token=TOKEN)
    assert TOKEN not in caplog.text and "guess-G0es-here" not in caplog.text
    assert "invalid bearer token" in caplog.text


def test_health_needs_a_token_when_not_exempt():
    async def body(h: Harness) -> None:
        health = health_pb2_grpc.HealthStub(h.channel)
        error = await _error(health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        await h.wait_count("Health.Check", "UNAUTHENTICATED", 1)

    run(body, auth_token=TOKEN, auth_exempt_health=False)


def test_no_auth_when_no_token():
    async def body(h: Harness) -> None:
        assert await h.unary()(b"hi", timeout=5) == b"hi"

    run(body)


# -- request ids ------------------------------------------------------------------------------------


def test_request_ids_are_taken_or_made_and_returned():
    async def body(h: Harness) -> None:
        call = h.unary()(b"rid", metadata=((REQUEST_ID_KEY, "req-42"),), timeout=5)
        assert await call == b"req-42"
        assert (REQUEST_ID_KEY, "req-42") in tuple(await call.trailing_metadata())
        made = await h.unary()(b"rid", timeout=5)
        assert len(made) == 32 and made != b"-"
        unsafe = await h.unary()(b"rid", metadata=((REQUEST_ID_KEY, "x" * 500),), timeout=5)
        assert len(unsafe) == 32
        call = h.unary()(b"abort", metadata=((REQUEST_ID_KEY, "req-43"),), timeout=5)
        await _error(call)
        assert (REQUEST_ID_KEY, "req-43") in tuple(await call.trailing_metadata())

    run(body)
    assert current_request_id() == "-"


# -- errors and metrics -----------------------------------------------------------------------------


def test_unexpected_errors_become_internal_with_a_logged_request_id(caplog):
    async def body(h: Harness) -> None:
        error = await _error(h.unary()(b"boom", metadata=((REQUEST_ID_KEY, "req-boom"),), timeout=5))
        assert (error.code(), error.details()) == (grpc.StatusCode.INTERNAL, "internal error")
        error = await _error(h.unary()(b"invalid", timeout=5))
        assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "top_k must be in [1, 256]")
        await h.wait_count("GetServerInfo", "INTERNAL", 1)
        await h.wait_count("GetServerInfo", "INVALID_ARGUMENT", 1)

    run(body)
    record = next(r for r in caplog.records if "unhandled error" in r.getMessage())
    assert "req-boom" in record.getMessage() and record.exc_info is not None
    assert "secret internals" not in record.getMessage()


def test_metrics_count_every_outcome():
    async def body(h: Harness) -> None:
        assert await h.unary()(b"ok", timeout=5) == b"ok"
        assert (await _error(h.unary()(b"abort", timeout=5))).code() == grpc.StatusCode.NOT_FOUND
        assert (await _error(h.unary()(b"setcode", timeout=5))).code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (await _error(h.unary()(b"slow", timeout=0.2))).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert [m async for m in h.stream()(b"ok", timeout=5)] == [b"chunk0", b"chunk1", b"chunk2"]
        call = h.stream()(b"abort", timeout=5)
        assert await call.read() == b"chunk0"
        assert (await _error(call.read())).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert [m async for m in h.stream("Generate")(b"", timeout=5)] == [b"first", b"second"]
        bidi_call = h.channel.stream_stream(f"/{SERVICE}/EncodeActivations")(iter([b"a", b"b"]), timeout=5)
        assert [m async for m in bidi_call] == [b"A", b"B"]
        assert await h.unary("Tokenize")(b"x", timeout=5) == b"sync:x"  # sync handlers pass through untouched
        error = await _error(h.channel.unary_unary("/featurewire.v1.Featurewire/NoSuchMethod")(b"", timeout=5))
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED

        for method, code, expected in [
            ("GetServerInfo", "OK", 1), ("GetServerInfo", "NOT_FOUND", 1), ("GetServerInfo", "FAILED_PRECONDITION", 1),
            ("GetServerInfo", "DEADLINE_EXCEEDED", 1), ("Decompose", "OK", 1), ("Decompose", "RESOURCE_EXHAUSTED", 1),
            ("Generate", "OK", 1), ("EncodeActivations", "OK", 1), ("other", "UNIMPLEMENTED", 1),
        ]:
            await h.wait_count(method, code, expected)
        registry = h.metrics.registry
        assert registry.get_sample_value("featurewire_rpc_duration_seconds_count",
                                         {"method": "GetServerInfo", "transport": "grpc"}) == 4
        assert registry.get_sample_value("featurewire_in_flight_requests", {"method": "Decompose"}) == 0

    run(body)


def test_client_cancellation_is_counted_and_frees_in_flight():
    async def body(h: Harness) -> None:
        call = h.unary()(b"slow", timeout=30)
        await asyncio.sleep(0.2)
        registry = h.metrics.registry
        assert registry.get_sample_value("featurewire_in_flight_requests", {"method": "GetServerInfo"}) == 1
        call.cancel()
        await h.wait_count("GetServerInfo", "CANCELLED", 1)
        assert registry.get_sample_value("featurewire_in_flight_requests", {"method": "GetServerInfo"}) == 0

    run(body)


def test_cancelled_stream_is_counted_and_frees_in_flight():
    async def body(h: Harness) -> None:
        call = h.stream()(b"slow", timeout=30)
        assert await call.read() == b"chunk0"
        call.cancel()
        await h.wait_count("Decompose", "CANCELLED", 1)
        assert h.metrics.registry.get_sample_value("featurewire_in_flight_requests", {"method": "Decompose"}) == 0

    run(body)
