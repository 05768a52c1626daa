"""Bounded loopback load against a real server process: many concurrent clients mixing Decompose, steered
Generate, cancellations and deadline expiries for a fixed time; reports throughput, the status-code mix,
p50/p99 latency per kind and the server's RSS before and after.

    python -m tests.reliability.load --model tiny-random --duration 60 --clients 16 [--json]
    python -m tests.reliability.load --model default --stack runs/demo/stack --duration 180

`--stack auto` (the default) serves runs/demo/stack with the default model when it exists, else the tiny
model with the smoke stack trained on the spot (seconds). tests/reliability/test_load.py runs a short version.
Loopback only: the server binds 127.0.0.1 on a free port.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import featurewire_pb2_grpc as pb_grpc
from featurewire.v1 import types_pb2 as t
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.server_process import launch

ROOT = Path(__file__).resolve().parents[2]
DEMO_STACK = ROOT / "runs" / "demo" / "stack"
KINDS = ("decompose", "generate", "cancel", "deadline")
EXPECTED = {"decompose": {"OK", "RESOURCE_EXHAUSTED"}, "generate": {"OK", "RESOURCE_EXHAUSTED"},
            "cancel": {"CANCELLED", "OK", "RESOURCE_EXHAUSTED"},
            "deadline": {"DEADLINE_EXCEEDED", "OK", "RESOURCE_EXHAUSTED"}}
"""Codes each kind may end with; anything else (INTERNAL, UNKNOWN, UNAVAILABLE, INVALID_ARGUMENT) is a failure."""
TEXTS = ("The quick brown fox jumps over the lazy dog.",
         "Sparse autoencoders decompose activations into features that a person can read.",
         "A production model server answers health checks, exports metrics and drains on shutdown.",
         "def add(a, b):\n    return a + b\n",
         "In 1969 the first message was sent over the network; it crashed after two letters.")


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@contextlib.contextmanager
def server_process(model: str, stack: Path, *, queue_size: int = 64, extra: tuple[str, ...] = ()
                   ) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`featurewire-serve serve` on 127.0.0.1 and a free port; yields (process, port) once ready; SIGTERM after."""
    server = launch(["--model", model, "--stack", str(stack), "--host", "127.0.0.1", "--port", "0",
                     "--metrics-port", "0", "--queue-size", str(queue_size), *extra])
    try:
        yield server.process, server.port
    finally:
        server.stop()


@dataclass
class Tally:
    codes: collections.Counter[str] = field(default_factory=collections.Counter)  # "kind:CODE"
    latencies: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))

    def add(self, kind: str, code: str, seconds: float) -> None:
        self.codes[f"{kind}:{code}"] += 1
        self.latencies[kind].append(seconds)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


class Mix:
    """Draws one request of each kind from what the server reports (stage names, feature counts)."""

    def __init__(self, info: pb.GetServerInfoResponse, rng: random.Random) -> None:
        stack = info.stacks[0]
        self.stages = [(s.name, s.d_sae) for s in stack.stages]
        self.rng = rng

    def decompose(self) -> pb.DecomposeRequest:
        return pb.DecomposeRequest(input=t.Input(text=self.rng.choice(TEXTS)), options=t.DecomposeOptions(
            top_k=self.rng.choice([4, 16, 32]), include_error=self.rng.random() < 0.5))

    def generate(self, tokens: int) -> pb.GenerateRequest:
        ops = [t.INTERVENTION_OP_ADD, t.INTERVENTION_OP_SET, t.INTERVENTION_OP_SCALE, t.INTERVENTION_OP_ABLATE]
        edits = []
        for _ in range(self.rng.randint(1, 3)):
            stage, d_sae = self.rng.choice(self.stages)
            edits.append(t.Intervention(stage=stage, feature=self.rng.randrange(d_sae), op=self.rng.choice(ops),
                                        value=self.rng.uniform(-4, 4)))
        decompose = t.DecomposeOptions(top_k=4) if self.rng.random() < 0.3 else None
        return pb.GenerateRequest(prompt=t.Input(text=self.rng.choice(TEXTS)), interventions=edits,
                                  decompose=decompose, sampling=pb.SamplingParams(
                                      max_new_tokens=tokens, temperature=self.rng.choice([0.0, 0.8]),
                                      seed=self.rng.randrange(2**32), ignore_eos=True))


async def _one(stub: pb_grpc.FeaturewireStub, mix: Mix, kind: str, tally: Tally, new_tokens: int) -> None:
    started = time.perf_counter()
    code = "OK"
    try:
        if kind == "decompose":
            async for _ in stub.Decompose(mix.decompose(), timeout=120):
                pass
        elif kind == "generate":
            async for _ in stub.Generate(mix.generate(new_tokens), timeout=120):
                pass
        elif kind == "cancel":
            call = stub.Generate(mix.generate(new_tokens * 4), timeout=120)
            for _ in range(mix.rng.randint(1, 3)):
                await call.read()
            call.cancel()
            code = "CANCELLED"
        else:
            async for _ in stub.Generate(mix.generate(new_tokens * 4), timeout=mix.rng.uniform(0.05, 0.5)):
                pass
    except grpc.aio.AioRpcError as exc:
        code = exc.code().name
    except asyncio.CancelledError:
        code = "CANCELLED"
    tally.add(kind, code, time.perf_counter() - started)


async def _client(stub: pb_grpc.FeaturewireStub, mix: Mix, stop_at: float, tally: Tally, new_tokens: int) -> None:
    while time.monotonic() < stop_at:
        await _one(stub, mix, mix.rng.choice(KINDS), tally, new_tokens)


async def _phase(target: str, seconds: float, clients: int, seed: int, new_tokens: int) -> Tally:
    tally = Tally()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.FeaturewireStub(channel)
        info = await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
        stop_at = time.monotonic() + seconds
        await asyncio.gather(*(_client(stub, Mix(info, random.Random(seed * 1000 + i)), stop_at, tally, new_tokens)
                               for i in range(clients)))
    return tally


def run_load(target: str, pid: int, *, duration_s: float, clients: int, warmup_s: float = 5.0, seed: int = 0,
             new_tokens: int = 8) -> dict[str, Any]:
    """Warm up, then load for `duration_s`; the report counts only the measured phase."""
    asyncio.run(_phase(target, warmup_s, clients, seed + 1, new_tokens))
    rss_before = rss_bytes(pid)
    started = time.perf_counter()
    tally = asyncio.run(_phase(target, duration_s, clients, seed, new_tokens))
    elapsed = time.perf_counter() - started
    rss_after = rss_bytes(pid)
    with grpc.insecure_channel(target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    all_latencies = [x for values in tally.latencies.values() for x in values]
    unexpected = {k: n for k, n in tally.codes.items() if k.split(":")[1] not in EXPECTED[k.split(":")[0]]}
    return {
        "clients": clients, "seconds": round(elapsed, 2), "requests": sum(tally.codes.values()),
        "throughput_rps": round(sum(tally.codes.values()) / elapsed, 2),
        "codes": dict(sorted(tally.codes.items())), "unexpected": unexpected,
        "latency_s": {kind: {"n": len(v), "p50": round(_percentile(v, 50), 4), "p99": round(_percentile(v, 99), 4)}
                      for kind, v in sorted(tally.latencies.items())}
        | {"all": {"n": len(all_latencies), "p50": round(_percentile(all_latencies, 50), 4),
                   "p99": round(_percentile(all_latencies, 99), 4)}},
        "rss_before_bytes": rss_before, "rss_after_bytes": rss_after, "rss_growth_bytes": rss_after - rss_before,
        "health_after": health_pb2.HealthCheckResponse.ServingStatus.Name(status),
    }


def _smoke_stack(out: Path) -> Path:
    from trainer.training.config import load_config
    from trainer.training.loop import run_training

    return run_training(load_config(ROOT / "trainer" / "configs" / "smoke.toml"), out, progress=False).stack_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="auto", help="auto | default | tiny-random (auto: default with the demo "
                        "stack when runs/demo/stack exists, else tiny-random)")
    parser.add_argument("--stack", default="auto", help="a stack directory, or auto")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of measured load")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of load before RSS is first read")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens per steered Generate (x4: cancel, deadline)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    demo = DEMO_STACK.joinpath("stack.json").is_file()
    model = args.model if args.model != "auto" else ("default" if demo and args.stack == "auto" else "tiny-random")
    with tempfile.TemporaryDirectory() as tmp:
        if args.stack != "auto":
            stack = Path(args.stack)
        elif model == "default" and demo:
            stack = DEMO_STACK
        else:
            stack = _smoke_stack(Path(tmp) / "smoke")
        with server_process(model, stack) as (process, port):
            report = run_load(f"127.0.0.1:{port}", process.pid, duration_s=args.duration, clients=args.clients,
                              warmup_s=args.warmup, seed=args.seed, new_tokens=args.new_tokens)
    report |= {"model": model, "stack": stack.name if stack != DEMO_STACK else "runs/demo/stack"}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['requests']} requests in {report['seconds']} s from {args.clients} clients "
              f"({report['throughput_rps']} req/s) on {model} / {report['stack']}")
        print("codes:", ", ".join(f"{k} {n}" for k, n in report["codes"].items()))
        for kind, lat in report["latency_s"].items():
            print(f"  {kind:9s} n={lat['n']:5d} p50={lat['p50'] * 1000:8.1f} ms p99={lat['p99'] * 1000:8.1f} ms")
        print(f"server RSS {report['rss_before_bytes'] >> 20} MiB -> {report['rss_after_bytes'] >> 20} MiB, "
              f"health {report['health_after']}, unexpected codes: {report['unexpected'] or 'none'}")
    return 1 if report["unexpected"] or report["health_after"] != "SERVING" else 0


if __name__ == "__main__":
    sys.exit(main())
