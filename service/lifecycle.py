"""What every featurewire server shares, whatever it serves: bind, health, metrics, drain, stop, signals.

The port is bound and grpc.health.v1 answers before anything loads, so Kubernetes probes see a live but
NOT_SERVING pod while it starts (Featurewire RPCs answer UNAVAILABLE meanwhile). Readiness turns SERVING
only after `_load` and `_warm_up` have finished and `_attach` has handed the servicer what it serves.

SIGTERM/SIGINT: readiness off and new calls refused (UNAVAILABLE), then `server.stop(grace)` lets
in-flight streams finish for up to `drain_grace_s` before cancelling them; `run_server` then returns 0.
A second signal while draining cancels what is left.

With `http_port` set, the HTTP/JSON gateway (service/http/) starts right after the gRPC listener, on the
same loop; it makes every call through gRPC, so it drains with it (503), and it is shut down once the
gRPC server has stopped.

Why a base class of its own: the full server (service/server.py) loads torch, transformers and a host
model; the activation-only server (service/activation_server.py) must not, so this module imports
neither (grpc, reflection and prometheus only).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import signal
from typing import Any

import grpc
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import featurewire_pb2_grpc as pb_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from core.errors import FailedPrecondition
from service.config import ServerConfig
from service.health import HEALTH_SERVICE_NAME, Health
from service.interceptors import build_interceptors
from service.metrics import Metrics, start_metrics_server

log = logging.getLogger(__name__)

SERVICE_NAMES = (pb.DESCRIPTOR.services_by_name["Featurewire"].full_name, HEALTH_SERVICE_NAME,
                 reflection.SERVICE_NAME)


class ServerBase(abc.ABC):
    """One grpc.aio server with health, reflection and metrics. Create and use it on one event loop."""

    servicer: Any  # a pb_grpc.FeaturewireServicer with `drain()`; set by the subclass

    def __init__(self, config: ServerConfig, *, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.metrics = Metrics(registry or CollectorRegistry())
        self.health = Health()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._gateway: Any = None  # service.http.gateway.HttpGateway when http_port is set
        self._metrics_http: Any = None
        self._stop_task: asyncio.Future[None] | None = None
        self._cancelling: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    @property
    def target(self) -> str:
        """Where a local client connects, e.g. `127.0.0.1:50051`."""
        return f"127.0.0.1:{self.port}"

    # -- what a subclass provides ----------------------------------------------------------------
    @abc.abstractmethod
    async def _load(self) -> None:
        """Load what the server serves (model, stacks, sessions)."""

    @abc.abstractmethod
    async def _warm_up(self) -> None:
        """Run one pass so that the first request is not the slow one."""

    @abc.abstractmethod
    def _attach(self) -> str:
        """Hand the loaded state to the servicer; returns a line for the ready log message."""

    def loaded_tokenizer(self) -> Any:
        """The host model's tokenizer once loaded (the OpenAI API's chat templates and log-probability tokens), else
        None; a server without a host model has none."""
        return None

    @abc.abstractmethod
    async def _shutdown_backend(self) -> None:
        """Release what `_load` started (worker threads), after the gRPC server has stopped."""

    # -- startup --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind and answer health checks, then load and warm up; SERVING when done."""
        self._grpc = self._build()
        self.port = self._bind(self._grpc)
        gateway_target = self._gateway_target(self._grpc)
        await self._grpc.start()
        await self.health.set_starting()
        scheme = "TLS" if self.config.tls_enabled else "plaintext"
        log.info("featurewire listening on %s:%d (%s)", self.config.host, self.port, scheme)
        try:
            self._start_metrics()
            await self._start_gateway(gateway_target)
            await self._load()
            await self._warm_up()
        except BaseException:
            await self.stop(grace=0)
            raise
        ready = self._attach()
        await self.health.set_ready()
        log.info("featurewire ready: %s", ready)

    def _build(self) -> grpc.aio.Server:
        limit = self.config.max_message_bytes
        server = grpc.aio.server(
            interceptors=build_interceptors(self.config, self.metrics),
            options=[("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit),
                     ("grpc.so_reuseport", 0)],  # a port already in use fails loudly instead of sharing it
        )
        pb_grpc.add_FeaturewireServicer_to_server(self.servicer, server)
        self.health.register(server)
        reflection.enable_server_reflection(SERVICE_NAMES, server)
        return server

    def _bind(self, server: grpc.aio.Server) -> int:
        address = self.config.address
        try:
            if self.config.tls_enabled:
                port = server.add_secure_port(address, _tls_credentials(self.config))
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise FailedPrecondition(f"cannot listen on {address}: {exc}") from None
        if not port:
            raise FailedPrecondition(f"cannot listen on {address} (in use or not a local address)")
        return port

    def _gateway_target(self, server: grpc.aio.Server) -> str | None:
        """Where the HTTP gateway calls this server: its own port on 127.0.0.1 when that listener is plaintext and
        reachable there; else (TLS, or a host that is not loopback or a wildcard) a plaintext port on 127.0.0.1
        added for the gateway alone, on the same server (same servicer and interceptors, auth included)."""
        if self.config.http_port is None:
            return None
        if not self.config.tls_enabled and self.config.host.strip("[]") in ("::", "0.0.0.0", "127.0.0.1"):
            return self.target
        port = server.add_insecure_port("127.0.0.1:0")
        if not port:
            raise FailedPrecondition("cannot listen on 127.0.0.1 for the HTTP gateway's calls")
        return f"127.0.0.1:{port}"

    async def _start_gateway(self, target: str | None) -> None:
        if target is None:
            return
        from service.http.gateway import HttpGateway  # starlette and uvicorn are imported only when it is on

        self._gateway = HttpGateway(self.config, target, self.loaded_tokenizer)
        self.http_port = await self._gateway.start()
        scheme = "https" if self.config.tls_enabled else "http"
        log.info("HTTP/JSON gateway on %s://%s:%d (calls %s)", scheme, self.config.host, self.http_port, target)

    def _start_metrics(self) -> None:
        if self.config.metrics_port == 0:
            return
        try:
            self._metrics_http, _ = start_metrics_server(self.config.metrics_port, self.metrics.registry,
                                                         addr=self.config.metrics_host)
        except OSError as exc:
            raise FailedPrecondition(f"cannot serve metrics on {self.config.metrics_host}:"
                                     f"{self.config.metrics_port}: {exc.strerror}") from None
        self.metrics_port = self._metrics_http.server_port
        log.info("metrics on http://%s:%d/metrics", self.config.metrics_host, self.metrics_port)

    # -- shutdown -------------------------------------------------------------------------------
    async def drain(self) -> None:
        """Readiness off and new Featurewire calls refused (UNAVAILABLE); running calls continue."""
        self.servicer.drain()
        await self.health.set_draining()

    async def stop(self, grace: float | None = None) -> None:
        """Drain, let in-flight calls finish for `grace` seconds (default drain_grace_s), then stop everything.

        Idempotent: later calls wait for the first one to finish.
        """
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop(self.config.drain_grace_s if grace is None else grace))
        await asyncio.shield(self._stop_task)

    async def _stop(self, grace: float) -> None:
        await self.drain()
        if self._grpc is not None:
            log.info("stopping: in-flight calls get up to %.1fs", grace)
            await self._grpc.stop(grace)
        if self._gateway is not None:  # every call it made has ended with the gRPC server
            await self._gateway.stop()
            self._gateway = None
        await self._shutdown_backend()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
        await self.health.set_stopped()
        self._stopped.set()
        log.info("featurewire stopped")

    def request_stop(self) -> None:
        """From a signal handler: start stopping once; a second request cancels the remaining calls."""
        loop = asyncio.get_running_loop()
        if self._stop_task is None:
            log.info("shutdown requested: draining")
            self._stop_task = loop.create_task(self._stop(self.config.drain_grace_s))
        elif self._grpc is not None and self._cancelling is None:
            log.warning("second shutdown request: cancelling the remaining calls")
            self._cancelling = loop.create_task(self._grpc.stop(0))

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _tls_credentials(config: ServerConfig) -> grpc.ServerCredentials:
    assert config.tls_cert is not None and config.tls_key is not None
    try:
        cert, key = config.tls_cert.read_bytes(), config.tls_key.read_bytes()
    except OSError as exc:
        raise FailedPrecondition(f"cannot read the TLS certificate or key {exc.filename!r}: {exc.strerror}") from None
    return grpc.ssl_server_credentials([(key, cert)])


async def run_server(server: ServerBase, *, ready_event: asyncio.Event | None = None,
                     handle_signals: bool = True) -> int:
    """Run `server` until SIGTERM/SIGINT (or `stop`), then return the exit status 0.

    A signal during startup abandons the loading and stops at once; a startup failure raises.
    """
    loop = asyncio.get_running_loop()
    if handle_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.request_stop)
    starting = asyncio.ensure_future(server.start())
    stopped = asyncio.ensure_future(server.wait_stopped())
    try:
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            log.info("shutdown requested during startup")
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return 0
        starting.result()  # a startup failure raises here
        if ready_event is not None:
            ready_event.set()
        await stopped
    finally:
        stopped.cancel()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    return 0
