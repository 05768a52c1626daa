"""Reliability fixtures: one in-process server on a tiny model and stack for the fuzz and auth tests, and the
request counter the fuzz tests report.

The server reuses the service tests' helpers (tests/service/conftest.py: ServerLoop, start_server,
server_config); its limits are small so that every valid request the fuzzer stumbles on is cheap.
`FEATUREWIRE_FUZZ_EXAMPLES` sets hypothesis' examples per property (`make soak` raises it).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.conftest import SMOKE, Running, ServerLoop, server_config, start_server

FUZZ_EXAMPLES = int(os.environ.get("FEATUREWIRE_FUZZ_EXAMPLES", "30"))
FUZZ_LIMITS = {"max_prompt_tokens": 48, "max_new_tokens": 6, "max_top_k": 32, "max_interventions": 6,
               "max_batch_vectors": 16, "max_message_bytes": 1 << 20, "queue_size": 16, "request_timeout_s": 60.0}
TRIED: collections.Counter[tuple[str, str]] = collections.Counter()
"""Requests sent by the fuzz tests, by (RPC, status code name) (reported at the end of the session)."""


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process (Linux /proc); 0 where /proc is missing."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@pytest.fixture(scope="session")
def rel_stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke stack (tiny-random, two TopK stages), trained once for these tests (a few seconds)."""
    from trainer.training.config import load_config
    from trainer.training.loop import run_training

    return run_training(load_config(SMOKE), tmp_path_factory.mktemp("rel-stack"), progress=False).stack_dir


@pytest.fixture(scope="session")
def rel_loop() -> Iterator[ServerLoop]:
    loop = ServerLoop()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def fuzz_server(rel_loop: ServerLoop, rel_stack: Path) -> Iterator[Running]:
    running = start_server(rel_loop, server_config(rel_stack, **FUZZ_LIMITS))
    yield running
    running.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TRIED:
        return
    rpcs: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for (rpc, code), n in TRIED.items():
        rpcs[rpc][code] += n
    terminalreporter.write_line(f"reliability fuzz: {sum(TRIED.values())} requests tried")
    for rpc, codes in sorted(rpcs.items()):
        mix = ", ".join(f"{code} {n}" for code, n in codes.most_common())
        terminalreporter.write_line(f"  {rpc}: {sum(codes.values())} ({mix})")
