"""Reliability fixtures: a server process on a tiny model and stack for the fuzz tests (so that its memory is
measured alone, without the fuzzer's), an in-process one for the auth and fault tests, and the request counter
the fuzz tests report.

The in-process server reuses the service tests' helpers (tests/service/conftest.py: ServerLoop, start_server,
server_config). The fuzz server's limits are small so that every valid request the fuzzer stumbles on is cheap.
`FEATUREWIRE_FUZZ_EXAMPLES` sets hypothesis' examples per property (`make soak` raises it).
"""

from __future__ import annotations

import collections
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import featurewire_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.server_process import ServerProcess, launch
from tests.service.conftest import SMOKE, ServerLoop

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


FUZZ_EXPLANATIONS = {"blocks.1.hook_resid_post": {0: "cats and dogs", 3: "the word the"},
                     "blocks.2.hook_mlp_out": {1: "Dogs"}}


@pytest.fixture(scope="session")
def fuzz_stack(rel_stack: Path, tiny_gemma, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the smoke stack with feature dashboards and explanations, so the fuzzer reaches GetFeature's
    dashboard, ListFeatures and explanation search too."""
    from core.stack.dashboards import attach_explanations
    from trainer.dashboards.accumulator import DashboardSettings
    from trainer.dashboards.build import build_dashboards
    from trainer.data.corpus import load_corpus

    stack = Path(shutil.copytree(rel_stack, tmp_path_factory.mktemp("fuzz-stack") / "stack"))
    settings = DashboardSettings(top_n=4, context=3, quantiles=3, per_quantile=2, logit_n=5, neighbours=4,
                                 cooccurrence=4)
    build_dashboards(stack, tiny_gemma, load_corpus("default")[:4], corpus="default", settings=settings,
                     context_length=64, batch_size=8, max_tokens=2000, progress=False)
    attach_explanations(stack, FUZZ_EXPLANATIONS)
    return stack


@pytest.fixture(scope="session")
def rel_loop() -> Iterator[ServerLoop]:
    loop = ServerLoop()
    yield loop
    loop.close()


@dataclass
class ServedProcess:
    """A `featurewire-serve serve` process and a client channel to it (the fuzz tests' view of a server)."""

    server: ServerProcess
    channel: grpc.Channel
    stub: pb_grpc.FeaturewireStub

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def rss(self) -> int:
        return rss_bytes(self.server.process.pid)

    def health(self, service: str = "") -> str:
        response = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                 timeout=10)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


@pytest.fixture(scope="session")
def fuzz_server(fuzz_stack: Path) -> Iterator[ServedProcess]:
    env = {f"FEATUREWIRE_{name.upper()}": str(value) for name, value in FUZZ_LIMITS.items()}
    server = launch(["--model", "tiny-random", "--device", "cpu", "--stack", str(fuzz_stack), "--host", "127.0.0.1",
                     "--port", "0", "--http-port", "0", "--metrics-port", "0", "--drain-grace", "5"], env=env)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield ServedProcess(server, channel, pb_grpc.FeaturewireStub(channel))
    finally:
        channel.close()
        server.stop()


@dataclass(frozen=True)
class World:
    """What the server reports, so drawn requests can hit real stages, features and hookpoints."""

    stack: str
    stages: tuple[str, ...]
    d_sae: tuple[int, ...]
    d_in: tuple[int, ...]
    vocab: int
    hookpoints: tuple[tuple[str, int], ...]


@pytest.fixture(scope="module")
def world(fuzz_server: ServedProcess) -> World:
    info = fuzz_server.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
    stack = info.stacks[0]
    return World(stack.name, tuple(s.name for s in stack.stages), tuple(s.d_sae for s in stack.stages),
                 tuple(s.d_in for s in stack.stages), info.model.vocab_size,
                 tuple((h.name, h.d) for h in info.hookpoints))


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
