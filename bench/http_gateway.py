"""The HTTP/JSON gateway's cost: Decompose over HTTP (SSE, JSON) vs the same call over gRPC, in one run.

    python bench/http_gateway.py [--tokens 128] [--repeats 20] [--json]                  # tiny-random, random stack
    python bench/http_gateway.py --model default --stack runs/demo/stack [--tokens 128]

A real `featurewire-serve serve --http-port 0` process (so the client's work never shares the server's
GIL), and from this process the same Decompose request (every stage, top-k 32, error norms, chunks of 32
tokens) sent both ways: `grpc` through the generated stub (protobuf responses), `http` as
`POST /v1/Decompose` on a kept-alive connection, the SSE body read to its status event and every event's
JSON parsed. The gateway makes a gRPC call to the server for each HTTP request, so the ratio is its whole
cost: HTTP, the loopback call, the proto3 JSON encoding of the responses on the server and their parsing
here (`json_encode` times the server's encoding of the same responses, alone, in this process).
Variants run interleaved per repeat (order alternating); the ratio is the median of per-repeat ratios.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import featurewire_pb2_grpc as pb_grpc
from featurewire.v1 import types_pb2 as t
from google.protobuf import json_format
from hook_overhead import machine, measure, median_ratio, prompt_ids
from serve_overhead import random_stack

from core.config import ModelConfig
from core.host.loading import load_host_model
from service.http.jsonmap import to_json

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.15


class ServerProcess:
    """`python -m service serve ... --port 0 --http-port 0`, ready when it logs so; both ports and the engine's torch
    thread count read from its log. `extra` flags go to `serve` (e.g. `--threads 1`)."""

    def __init__(self, model: str, stack: Path, timeout: float = 600, extra: Sequence[str] = ()) -> None:
        command = [sys.executable, "-m", "service", "serve", "--model", model, "--stack", str(stack),
                   "--host", "127.0.0.1", "--port", "0", "--http-port", "0", "--metrics-port", "0", "--no-self-check",
                   *extra]
        self.process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                self.lines.append(line)
                if "featurewire ready" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        waited = 0.0
        while not ready.wait(0.5):
            waited += 0.5
            if self.process.poll() is not None or waited >= timeout:
                self.stop()
                raise RuntimeError("the server did not become ready:\n" + "".join(self.lines[-30:]))
        log = "".join(self.lines)
        self.grpc_port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", log).group(1))  # type: ignore[union-attr]
        self.http_port = int(re.search(r"gateway on http://127\.0\.0\.1:(\d+)", log).group(1))  # type: ignore[union-attr]
        threads = re.search(r"engine: (\d+) torch threads", log)
        self.threads = int(threads.group(1)) if threads else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def read_events(response: http.client.HTTPResponse) -> list[Any]:
    """Every event of an SSE body, data parsed; raises unless the stream ends with an OK status event."""
    parsed = [json.loads(line[6:]) for line in response.read().decode().splitlines() if line.startswith("data: ")]
    if not parsed or parsed[-1].get("code") != "OK":
        raise RuntimeError(f"the stream did not end OK: {parsed[-1:] or response.status}")
    return parsed[:-1]


def report(model: str, stack_arg: str, tokens: int, repeats: int, warmup: int) -> dict[str, Any]:
    host = load_host_model(ModelConfig(name=model, device="auto"))
    with tempfile.TemporaryDirectory() as tmp:
        stack_dir = random_stack(host, Path(tmp) / "stack") if stack_arg == "random" else Path(stack_arg).resolve()
        server = ServerProcess(model, stack_dir)
        try:
            channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
            stub = pb_grpc.FeaturewireStub(channel)
            (stack,) = stub.ListStacks(pb.ListStacksRequest(), timeout=60).stacks[:1]
            ids = [int(i) for i in prompt_ids(host, tokens)[0].tolist()]
            request = pb.DecomposeRequest(stack=stack.name, input=t.Input(token_ids=t.TokenIds(ids=ids)),
                                          options=t.DecomposeOptions(top_k=32, include_error=True), chunk_tokens=32)
            body = json.dumps(json_format.MessageToDict(request)).encode()
            connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=600)

            def over_http() -> list[Any]:
                connection.request("POST", "/v1/Decompose", body=body, headers={"content-type": "application/json"})
                return read_events(connection.getresponse())

            responses = list(stub.Decompose(request, timeout=600))
            if over_http() != [json_format.MessageToDict(m) for m in responses]:
                raise RuntimeError("HTTP and gRPC answered differently")
            calls = {
                "grpc": lambda: list(stub.Decompose(request, timeout=600)),
                "http": over_http,
                "json_encode": lambda: [to_json(m) for m in responses],
            }
            times = measure(calls, repeats, warmup, host.device)
            connection.close()
            channel.close()
        finally:
            server.stop()
    return {
        "benchmark": "http_gateway", "machine": machine(host), "tokens": tokens, "repeats": repeats,
        "stack": {"path": str(stack_arg), "name": stack.name, "stages": len(stack.stages)},
        "messages": len(responses), "protobuf_bytes": sum(m.ByteSize() for m in responses),
        "json_bytes": sum(len(to_json(m)) for m in responses),
        "median_seconds": {name: statistics.median(values) for name, values in times.items()},
        "comparisons": [
            {"what": f"HTTP/JSON (SSE) Decompose of {tokens} tokens / the same gRPC call",
             "ratio": median_ratio(times, "http", "grpc"), "target": TARGET},
            {"what": "proto3 JSON encoding of the responses (the gateway's share) / the gRPC call",
             "ratio": median_ratio(times, "json_encode", "grpc")},
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-random", help="tiny-random (default), default, a directory or .gguf")
    parser.add_argument("--stack", default="random", help="a stack directory, or 'random' (a random TopK stack)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = report(args.model, args.stack, args.tokens, args.repeats, args.warmup)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    m, seconds = result["machine"], result["median_seconds"]
    print(f"{m['model']} on {m['device']} ({m['cpu']}, {m['cpu_count']} CPUs), stack {result['stack']['name']} "
          f"({result['stack']['stages']} stages), {args.tokens} tokens in {result['messages']} messages "
          f"({result['protobuf_bytes']} B protobuf, {result['json_bytes']} B JSON), {args.repeats} repeats")
    print("median seconds: " + "  ".join(f"{name} {value:.4f}" for name, value in seconds.items()))
    for row in result["comparisons"]:
        target = f"  (target {row['target']})" if "target" in row else ""
        print(f"{row['ratio']:7.3f}  {row['what']}{target}")


if __name__ == "__main__":
    main()
