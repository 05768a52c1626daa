"""grpc.health.v1 for Kubernetes probes: overall, per-service, liveness and readiness names.

Liveness says "the process is not wedged" and stays SERVING while the model loads and while the
server drains, so the kubelet does not restart a pod that is merely busy. Readiness (and the overall
"" and service names, which plain gRPC clients check) turns SERVING only once the model and stacks are
loaded, self-checked and warmed up, and goes NOT_SERVING first on SIGTERM so traffic moves away
before `server.stop(grace)` drains in-flight streams.

Uses the asyncio servicer from grpcio-health-checking, so its methods are coroutines and must run on
the server's event loop.
"""

from __future__ import annotations

import logging
from enum import Enum

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from service.metrics import SERVICE

log = logging.getLogger(__name__)

OVERALL = ""
LIVENESS = "liveness"
READINESS = "readiness"
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class State(Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


class Health:
    """The server's health as one small state machine: starting → ready → draining → stopped.

    Draining and stopped are one-way: a late `set_ready()` (e.g. a warm-up finishing during
    shutdown) cannot put a draining server back into rotation.
    """

    NAMES = (OVERALL, SERVICE, LIVENESS, READINESS)

    def __init__(self) -> None:
        self.servicer = health_aio.HealthServicer()
        self.state = State.STARTING
        self._statuses: dict[str, int] = {}

    def register(self, server: grpc.aio.Server) -> None:
        """Add the grpc.health.v1 service to an asyncio server (before `server.start()`)."""
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def set_starting(self) -> None:
        """Alive but not ready: the model and stacks are still loading."""
        if self.state in (State.DRAINING, State.STOPPED):
            return
        self.state = State.STARTING
        await self._apply(live=True, ready=False)

    async def set_ready(self) -> None:
        """Loaded, self-checked and warmed up: accept traffic."""
        if self.state in (State.DRAINING, State.STOPPED):
            log.info("health: ignoring set_ready() while %s", self.state.value)
            return
        self.state = State.READY
        await self._apply(live=True, ready=True)
        log.info("health: SERVING")

    async def set_draining(self) -> None:
        """Shutting down: refuse new traffic but stay alive while in-flight streams finish."""
        if self.state is State.STOPPED:
            return
        self.state = State.DRAINING
        await self._apply(live=True, ready=False)
        log.info("health: draining")

    async def set_stopped(self) -> None:
        """Everything NOT_SERVING, permanently (the servicer ignores any later change)."""
        self.state = State.STOPPED
        await self._apply(live=False, ready=False)
        await self.servicer.enter_graceful_shutdown()

    def statuses(self) -> dict[str, str]:
        """Current status per service name, as enum names (for GetServerInfo, logs and tests)."""
        return {name: health_pb2.HealthCheckResponse.ServingStatus.Name(status)
                for name, status in self._statuses.items()}

    async def _apply(self, *, live: bool, ready: bool) -> None:
        ready_status = SERVING if ready else NOT_SERVING
        wanted = {
            LIVENESS: SERVING if live else NOT_SERVING,
            READINESS: ready_status,
            OVERALL: ready_status,
            SERVICE: ready_status,
        }
        for name, status in wanted.items():
            self._statuses[name] = status
            await self.servicer.set(name, status)
