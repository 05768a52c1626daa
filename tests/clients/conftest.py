"""Client fixtures: one in-process featurewire server (tiny-random + a small trained stack), the scripted
fake server of `fakes.py`, and helpers shared by the client tests.

The stack is `tests/service/engine/tiny_stacks.py`'s (four stages: TopK, signed SA-GSAE, TopK and a
residualized TopK stage), fitted in memory in about a second, instead of the trainer's smoke run that
`tests/service` trains (half a minute); the server helpers are tests/service's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clients.fakes import Fake, Script, start_fake
from tests.service.conftest import Running, ServerLoop, server_config, start_server
from tests.service.engine.tiny_stacks import one_thread, write_tiny_stack

TOKEN = "client-test-token"
STAGES = ("resid1", "signed", "mlp2", "resid3")


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    """The in-process server's small matmuls on one torch thread: with other work on the cores, two threads
    spin-wait on each other and every request takes a second instead of milliseconds."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def client_loop() -> Iterator[ServerLoop]:
    loop = ServerLoop()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def client_stack(tiny_gemma, tmp_path_factory: pytest.TempPathFactory) -> Path:
    with one_thread():
        return write_tiny_stack(tiny_gemma, tmp_path_factory.mktemp("client-stack") / "stack")


@pytest.fixture(scope="session")
def fw_server(client_loop: ServerLoop, client_stack: Path) -> Iterator[Running]:
    """tiny-random + the tiny stack ("tiny"), on 127.0.0.1 and a free port."""
    running = start_server(client_loop, server_config(client_stack, self_check=False))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def target(fw_server: Running) -> str:
    return fw_server.target


@pytest.fixture(scope="session")
def auth_server(client_loop: ServerLoop) -> Iterator[Running]:
    """A server that requires `TOKEN` (no stack: auth is decided before any RPC runs)."""
    running = start_server(client_loop, server_config(None, auth_token=TOKEN))
    yield running
    running.stop()


@pytest.fixture
def fake() -> Iterator[Fake]:
    running = start_fake(Script())
    yield running
    running.stop()
