from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.health import LIVENESS, OVERALL, READINESS, Health, State
from service.metrics import SERVICE

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
NAMES = (OVERALL, SERVICE, LIVENESS, READINESS)


async def _with_server(body):
    health = Health()
    server = grpc.aio.server()
    health.register(server)
    await health.set_starting()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await body(health, health_pb2_grpc.HealthStub(channel))
    finally:
        await server.stop(None)


async def _statuses(stub) -> dict[str, int]:
    return {name: (await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status for name in NAMES}


def test_transitions_through_the_lifecycle():
    async def body(health: Health, stub) -> None:
        assert await _statuses(stub) == {OVERALL: NOT_SERVING, SERVICE: NOT_SERVING, LIVENESS: SERVING,
                                         READINESS: NOT_SERVING}
        await health.set_ready()
        assert set((await _statuses(stub)).values()) == {SERVING}
        assert health.statuses()[READINESS] == "SERVING" and health.state is State.READY
        await health.set_draining()
        assert await _statuses(stub) == {OVERALL: NOT_SERVING, SERVICE: NOT_SERVING, LIVENESS: SERVING,
                                         READINESS: NOT_SERVING}
        await health.set_ready()  # too late: draining is one-way
        assert (await _statuses(stub))[READINESS] == NOT_SERVING and health.state is State.DRAINING
        await health.set_stopped()
        assert set((await _statuses(stub)).values()) == {NOT_SERVING}
        await health.set_ready()
        assert set((await _statuses(stub)).values()) == {NOT_SERVING}

    asyncio.run(_with_server(body))


def test_unknown_service_is_not_found():
    async def body(health: Health, stub) -> None:
        try:
            await stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
        else:
            raise AssertionError("expected NOT_FOUND")

    asyncio.run(_with_server(body))


def test_watch_streams_readiness_changes():
    async def body(health: Health, stub) -> None:
        call = stub.Watch(health_pb2.HealthCheckRequest(service=READINESS), timeout=10)
        assert (await call.read()).status == NOT_SERVING
        await health.set_ready()
        assert (await call.read()).status == SERVING
        await health.set_draining()
        assert (await call.read()).status == NOT_SERVING
        call.cancel()

    asyncio.run(_with_server(body))
