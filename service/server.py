"""The gRPC server's lifecycle: bind, load, self-check, warm up, serve, drain, stop.

The port is bound and grpc.health.v1 answers before the model loads, so Kubernetes probes see a live
but NOT_SERVING pod while it starts (Featurewire RPCs answer UNAVAILABLE meanwhile). Readiness turns
SERVING only after every stack has loaded, passed its self-check and a warm-up pass has run.

Stacks fail fast: a stack that does not load or fails its self-check (wrong host model, hookpoint
mix-up, FVE/L0 off the recorded metrics) stops startup with its message and a non-zero exit, instead of
serving without it. A deployment that names a stack relies on it; a crash loop with a clear reason is
easier to notice than a replica that silently lacks a stack and answers NOT_FOUND. Operators who know
what they are doing can pass `--no-self-check`.

SIGTERM/SIGINT: readiness off and new calls refused (UNAVAILABLE), then `server.stop(grace)` lets
in-flight streams finish for up to `drain_grace_s` before cancelling them; `serve` then returns 0.
A second signal while draining cancels what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from pathlib import Path
from typing import Any

import grpc
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import featurewire_pb2_grpc as pb_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from service import __version__
from service.config import ModelConfig, ServerConfig
from service.engine.decompose import decompose_events
from service.engine.engine import Engine, deadline_after
from service.engine.host_model import HostModel
from service.engine.loading import load_host_model
from service.engine.served import ServedStack, load_served_stack
from service.engine.specs import DecomposeSpec
from service.errors import FailedPrecondition
from service.health import HEALTH_SERVICE_NAME, Health
from service.interceptors import build_interceptors
from service.metrics import Metrics, start_metrics_server
from service.servicer import FeaturewireServicer

log = logging.getLogger(__name__)

SERVICE_NAMES = (pb.DESCRIPTOR.services_by_name["Featurewire"].full_name, HEALTH_SERVICE_NAME,
                 reflection.SERVICE_NAME)
WARM_UP_TEXT = "The quick brown fox jumps over the lazy dog."
WARM_UP_TIMEOUT_S = 300.0


class Server:
    """One featurewire server: grpc.aio server, engine, health, metrics. Create and use it on one event loop."""

    def __init__(self, model_config: ModelConfig, config: ServerConfig, *,
                 registry: CollectorRegistry | None = None) -> None:
        self.model_config = model_config
        self.config = config
        self.metrics = Metrics(registry or CollectorRegistry())
        self.health = Health()
        self.servicer = FeaturewireServicer(config, self.metrics)
        self.host: HostModel | None = None
        self.stacks: dict[str, ServedStack] = {}
        self.engine: Engine | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._metrics_http: Any = None
        self._stop_task: asyncio.Future[None] | None = None
        self._cancelling: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    @property
    def target(self) -> str:
        """Where a local client connects, e.g. `127.0.0.1:50051`."""
        return f"127.0.0.1:{self.port}"

    # -- startup --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind and answer health checks, then load, self-check and warm up; SERVING when done."""
        self._grpc = self._build()
        self.port = self._bind(self._grpc)
        await self._grpc.start()
        await self.health.set_starting()
        scheme = "TLS" if self.config.tls_enabled else "plaintext"
        log.info("featurewire listening on %s:%d (%s)", self.config.host, self.port, scheme)
        try:
            self._start_metrics()
            await self._load()
            await self._warm_up()
        except BaseException:
            await self.stop(grace=0)
            raise
        assert self.host is not None and self.engine is not None
        self.servicer.attach(self.host, self.stacks, self.engine)
        await self.health.set_ready()
        log.info("featurewire ready: model %s, stacks %s", self.model_config.name, ", ".join(self.stacks) or "none")

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

    async def _load(self) -> None:
        """Host model, then every stack (self-checked), off the event loop so health keeps answering."""
        started = time.perf_counter()
        host = await asyncio.to_thread(load_host_model, self.model_config)
        self.host = host
        self.metrics.set_model_load_time(time.perf_counter() - started)
        summary = host.summary()
        self.metrics.set_build_info(__version__, host.name, summary.device, summary.dtype)
        for path in self.config.stacks:
            await self._load_stack(host, path)
        self.engine = Engine(host, self.stacks, self.config, self.metrics)

    async def _load_stack(self, host: HostModel, path: Path) -> None:
        started = time.perf_counter()
        stack = await asyncio.to_thread(load_served_stack, path, host, self_check=self.config.self_check)
        if stack.name in self.stacks:
            raise FailedPrecondition(f"two stacks are named {stack.name!r} ({self.stacks[stack.name].path} and "
                                     f"{path}); stack names must be unique on a server")
        seconds = time.perf_counter() - started
        self.stacks[stack.name] = stack
        self.metrics.register_stack(stack.name, stack.stage_names, seconds)
        if self.config.self_check:
            passed, fve = _self_check_summary(stack)
            self.metrics.record_self_check(stack.name, passed, fve)
        log.info("loaded stack %s (%d stages, digest %s) from %s in %.1fs", stack.name, len(stack.stage_names),
                 stack.digest[:12], path, seconds)

    async def _warm_up(self) -> None:
        """One short pass through the worker (per stack, a Decompose), so the first request is not the slow one."""
        assert self.engine is not None and self.host is not None
        host, engine = self.host, self.engine
        ids = tuple(int(i) for i in host.encode(WARM_UP_TEXT)[0].tolist())
        deadline = deadline_after(WARM_UP_TIMEOUT_S)
        started = time.perf_counter()
        if not self.stacks:
            await engine.call(lambda: host.forward(host.encode(WARM_UP_TEXT)), deadline=deadline, method="warmup")
        for stack in self.stacks.values():
            spec = DecomposeSpec(stack=stack.name, token_ids=ids, stages=tuple(range(len(stack.stage_names))),
                                 top_k=8, include_error=True)
            await engine.call(lambda s=stack, sp=spec: list(decompose_events(host, s, sp)), deadline=deadline,
                              method="warmup")
        log.info("warmed up in %.2fs", time.perf_counter() - started)

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
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown, 5.0)
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


def _self_check_summary(stack: ServedStack) -> tuple[bool, dict[str, float]]:
    """(passed, measured FVE by stage name) from the stack's self-check record {stage: {fve, passed, ...}}."""
    results = [(name, r) for name, r in stack.self_check.items() if isinstance(r, dict)]
    fve = {name: float(r["fve"]) for name, r in results if isinstance(r.get("fve"), int | float)}
    return all(bool(r.get("passed", True)) for _, r in results), fve


async def serve(model_config: ModelConfig, server_config: ServerConfig, *,
                ready_event: asyncio.Event | None = None, handle_signals: bool = True) -> int:
    """Run a server until SIGTERM/SIGINT (or `Server.stop`), then return the exit status 0.

    A signal during startup abandons the loading and stops at once; a startup failure raises.
    """
    server = Server(model_config, server_config)
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


__all__ = ["SERVICE_NAMES", "Server", "serve"]
