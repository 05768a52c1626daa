"""Service fixtures: a tiny stack trained once per session and in-process servers on port 0.

Every in-process server runs on ONE event loop in a background thread (grpc.aio is happiest with one
loop per process); tests talk to it with ordinary synchronous channels and the generated stubs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import pytest
from featurewire.v1 import featurewire_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core.config import ModelConfig
from service.config import ServerConfig

if TYPE_CHECKING:  # imported lazily, so a broken server module cannot stop the engine tests from collecting
    from service.server import Server

T = TypeVar("T")
SMOKE = Path(__file__).resolve().parents[2] / "trainer" / "configs" / "smoke.toml"
TINY = ModelConfig(name="tiny-random", device="cpu", dtype="float32")
QUEUE_SIZE = 2
MAX_NEW_TOKENS = 400  # the tiny model has 512 positions


class ServerLoop:
    """A daemon thread running one asyncio loop that hosts every in-process server of the session."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Any:
        """Schedule `coro` on the loop; returns a concurrent.futures.Future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


@dataclass
class Running:
    """A started server and a client for it."""

    server: Server
    loop: ServerLoop
    channel: grpc.Channel
    stub: pb_grpc.FeaturewireStub

    @property
    def target(self) -> str:
        return self.server.target

    def health(self, service: str = "") -> str:
        response = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                 timeout=10)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def stop(self, grace: float = 0.0) -> None:
        self.channel.close()
        self.loop.run(self.server.stop(grace))


def slow_generation(monkeypatch: pytest.MonkeyPatch, seconds_per_event: float) -> dict[str, Any]:
    """Make the servicer's generations take `seconds_per_event` per event, and record how far they got.

    Returns {"events": count, "closed": threading.Event set when a generation's generator is closed}.
    """
    import service.servicer as servicer_module

    real = servicer_module.generate_events
    record: dict[str, Any] = {"events": 0, "closed": threading.Event()}

    def slow(*args: Any) -> Iterator[Any]:
        try:
            for event in real(*args):
                time.sleep(seconds_per_event)
                record["events"] += 1
                yield event
        finally:
            record["closed"].set()

    monkeypatch.setattr(servicer_module, "generate_events", slow)
    return record


def make_server(loop: ServerLoop, config: ServerConfig, model: ModelConfig = TINY) -> Server:
    """Construct on the loop's thread, so every asyncio object belongs to that loop."""

    from service.server import Server

    async def build() -> Server:
        return Server(model, config)

    return loop.run(build())


def start_server(loop: ServerLoop, config: ServerConfig, *, credentials: grpc.ChannelCredentials | None = None,
                 host_override: str | None = None, model: ModelConfig = TINY) -> Running:
    server = make_server(loop, config, model)
    loop.run(server.start())
    if credentials is None:
        channel = grpc.insecure_channel(server.target)
    else:
        options = [("grpc.ssl_target_name_override", host_override)] if host_override else []
        channel = grpc.secure_channel(server.target, credentials, options=options)
    return Running(server, loop, channel, pb_grpc.FeaturewireStub(channel))


def server_config(stack: Path | None, **overrides: Any) -> ServerConfig:
    values: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "stacks": (stack,) if stack else (),
                              "drain_grace_s": 5.0, "max_new_tokens": MAX_NEW_TOKENS}
    values.update(overrides)
    return ServerConfig(**values)


@pytest.fixture(scope="session")
def tiny_stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke stack (tiny-random, two TopK stages), trained once per session."""
    from trainer.training.config import load_config
    from trainer.training.loop import run_training

    out = tmp_path_factory.mktemp("smoke-stack")
    return run_training(load_config(SMOKE), out, progress=False).stack_dir


@pytest.fixture(scope="session")
def server_loop() -> Iterator[ServerLoop]:
    loop = ServerLoop()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def served(server_loop: ServerLoop, tiny_stack: Path) -> Iterator[Running]:
    """The shared server: tiny-random + the smoke stack, queue of 2, on 127.0.0.1 and a free port."""
    running = start_server(server_loop, server_config(tiny_stack, queue_size=QUEUE_SIZE))
    yield running
    running.stop()
