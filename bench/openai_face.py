"""The OpenAI-compatible face's cost: a steered streamed completion through `/openai/v1/completions` vs the same
gRPC Generate, time to first token and decode tokens/s, in one run.

    python bench/openai_face.py [--prompt-tokens 64] [--new-tokens 32] [--repeats 20] [--json]   # tiny-random
    python bench/openai_face.py --model default [--stack DIR]             # Gemma 3 270M, a random stack by default

A real `featurewire-serve serve --http-port 0` process and, from this process, the same request four ways:
`grpc` through the generated stub (GenerateRequest: token-id prompt, one SET intervention on the first stage,
greedy, ignore_eos); `grpc_aio` the same through a grpc.aio channel (the client the face itself uses);
`openai` as `POST /openai/v1/completions` with `stream: true` on a kept-alive connection (the same request:
the prompt's token ids, `featurewire.interventions`, `logprobs: 0` so every token is one chunk), each `data:`
line read as it arrives and parsed; and `openai_sdk` through the official `openai` package (its httpx client
and pydantic chunk models: the client's own cost, informational). The face makes one gRPC Generate call per
choice to the server, so the ratio is its whole cost: HTTP, the loopback call, the chunk JSON written per
token on the server and parsed here. Time to first token: from sending the request to the first token's
message; decode tokens/s: the tokens after the first over the time after the first. Variants run
interleaved per repeat (order alternating); the ratios are medians of per-repeat ratios, so a machine shared
with other jobs slows both sides of each ratio alike.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import openai
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import featurewire_pb2_grpc as pb_grpc
from featurewire.v1 import types_pb2 as t
from hook_overhead import machine, prompt_ids
from http_gateway import ServerProcess
from serve_overhead import random_stack

from core.config import ModelConfig
from core.host.loading import load_host_model

TARGET = 1.1
IDLE_S = 4.0  # uvicorn's keep-alive timeout is 5 s
Timing = tuple[float, float, int, str]
"""(seconds to the first token, seconds in all, tokens, text) of one streamed generation."""


def grpc_stream(stub: pb_grpc.FeaturewireStub, request: pb.GenerateRequest) -> Timing:
    started = time.perf_counter()
    first, count, text = 0.0, 0, []
    for message in stub.Generate(request, timeout=600):
        if message.HasField("token"):
            count += 1
            first = first or time.perf_counter() - started
            text.append(message.token.text)
    return first, time.perf_counter() - started, count, "".join(text)


async def grpc_aio_stream(stub: Any, request: pb.GenerateRequest) -> Timing:
    started = time.perf_counter()
    first, count, text = 0.0, 0, []
    async for message in stub.Generate(request, timeout=600):
        if message.HasField("token"):
            count += 1
            first = first or time.perf_counter() - started
            text.append(message.token.text)
    return first, time.perf_counter() - started, count, "".join(text)


def openai_stream(connection: http.client.HTTPConnection, body: bytes) -> Timing:
    """The SSE body read line by line as it arrives, every chunk parsed, on a kept-alive connection; reopened
    (untimed) after 4 s idle, since uvicorn closes one idle for 5 s, as the other variants' turns take on a
    real model."""
    if time.monotonic() - getattr(connection, "last_used", 0.0) > IDLE_S:
        connection.close()
        connection.connect()
    started = time.perf_counter()
    connection.request("POST", "/openai/v1/completions", body=body, headers={"content-type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"the OpenAI face answered {response.status}: {response.read()[:300]!r}")
    first, count, text = 0.0, 0, []
    while line := response.readline():
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        choice = json.loads(line[6:])["choices"][0]
        if choice.get("logprobs"):
            count += 1
            first = first or time.perf_counter() - started
        text.append(choice["text"])
    done = time.perf_counter()
    connection.last_used = time.monotonic()  # type: ignore[attr-defined]
    return first, done - started, count, "".join(text)


def sdk_stream(client: openai.OpenAI, body: dict[str, Any]) -> Timing:
    started = time.perf_counter()
    first, count, text = 0.0, 0, []
    extra = {k: v for k, v in body.items() if k not in ("model", "prompt", "max_tokens", "temperature", "stream",
                                                          "logprobs")}
    stream = client.completions.create(model=body["model"], prompt=body["prompt"], max_tokens=body["max_tokens"],
                                       temperature=0, logprobs=0, stream=True, extra_body=extra)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs:
            count += 1
            first = first or time.perf_counter() - started
        text.append(chunk.choices[0].text if chunk.choices else "")
    return first, time.perf_counter() - started, count, "".join(text)


def measure(calls: dict[str, Callable[[], Timing]], repeats: int, warmup: int) -> dict[str, list[Timing]]:
    """Every variant once per repeat, order alternating; the warm-up runs are not kept."""
    times: dict[str, list[Timing]] = {name: [] for name in calls}
    names = list(calls)
    for repeat in range(warmup + repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            timing = calls[name]()
            if repeat >= warmup:
                times[name].append(timing)
    return times


async def _aio_channel(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}")


def decode_rate(timing: Timing) -> float:
    first, total, count, _ = timing
    return (count - 1) / (total - first)


def ratio(times: dict[str, list[Timing]], variant: str, value: Callable[[Timing], float], baseline: str = "grpc"
          ) -> float:
    return statistics.median(value(v) / value(g) for v, g in zip(times[variant], times[baseline], strict=True))


def report(model: str, stack_arg: str, prompt_tokens: int, new_tokens: int, repeats: int, warmup: int
           ) -> dict[str, Any]:
    host = load_host_model(ModelConfig(name=model, device="auto"))
    ids = [int(i) for i in prompt_ids(host, prompt_tokens)[0].tolist()]
    with tempfile.TemporaryDirectory() as tmp:
        stack_dir = random_stack(host, Path(tmp) / "stack") if stack_arg == "random" else Path(stack_arg).resolve()
        server = ServerProcess(model, stack_dir)
        try:
            channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
            stub = pb_grpc.FeaturewireStub(channel)
            info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=60)
            stack = info.stacks[0]
            pin = t.Intervention(stage=stack.stages[0].name, feature=1, op=t.INTERVENTION_OP_SET, value=5.0)
            request = pb.GenerateRequest(stack=stack.name, prompt=t.Input(token_ids=t.TokenIds(ids=ids)),
                                         sampling=pb.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True),
                                         interventions=[pin])
            body = {"model": f"{info.model.name}:{stack.name}", "prompt": ids, "max_tokens": new_tokens,
                    "temperature": 0, "stream": True, "logprobs": 0,
                    "featurewire": {"interventions": [{"stage": pin.stage, "feature": 1, "op": "INTERVENTION_OP_SET",
                                                       "value": 5.0}], "ignore_eos": True}}
            raw = json.dumps(body).encode()
            connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=600)
            loop = asyncio.new_event_loop()
            aio_channel = loop.run_until_complete(_aio_channel(server.grpc_port))
            aio_stub = pb_grpc.FeaturewireStub(aio_channel)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/openai/v1", api_key="unused",
                                   max_retries=0, timeout=600)
            calls = {"grpc": lambda: grpc_stream(stub, request),
                     "grpc_aio": lambda: loop.run_until_complete(grpc_aio_stream(aio_stub, request)),
                     "openai": lambda: openai_stream(connection, raw), "openai_sdk": lambda: sdk_stream(client, body)}
            texts = {name: call()[3] for name, call in calls.items()}
            if len(set(texts.values())) != 1:
                raise RuntimeError(f"the variants generated different text: {texts}")
            times = measure(calls, repeats, warmup)
            connection.close()
            client.close()
            channel.close()
            loop.run_until_complete(aio_channel.close())
            loop.close()
        finally:
            server.stop()
    medians = {name: {"ttft_s": statistics.median(v[0] for v in values),
                      "decode_tokens_per_s": statistics.median(decode_rate(v) for v in values),
                      "total_s": statistics.median(v[1] for v in values)} for name, values in times.items()}
    comparisons = []
    for variant, baseline in (("openai", "grpc"), ("openai", "grpc_aio"), ("openai_sdk", "grpc"),
                              ("grpc_aio", "grpc")):
        target = {"target": TARGET} if variant == "openai" else {}
        comparisons += [
            {"what": f"{variant} / {baseline}: time to first token", "ratio": ratio(times, variant, lambda v: v[0],
                                                                                     baseline), **target},
            {"what": f"{variant} / {baseline}: time per decoded token (1 / tokens/s)",
             "ratio": 1 / ratio(times, variant, decode_rate, baseline), **target},
            {"what": f"{variant} / {baseline}: whole stream", "ratio": ratio(times, variant, lambda v: v[1], baseline)},
        ]
    return {"benchmark": "openai_face", "machine": machine(host), "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "repeats": repeats, "stack": {"name": stack.name, "stages": len(stack.stages)},
            "medians": medians, "comparisons": comparisons}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-random", help="tiny-random (default), default, a directory or .gguf")
    parser.add_argument("--stack", default="random", help="a stack directory, or 'random' (a random TopK stack)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = report(args.model, args.stack, args.prompt_tokens, args.new_tokens, args.repeats, args.warmup)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    m = result["machine"]
    print(f"{m['model']} on {m['device']} ({m['cpu']}, {m['cpu_count']} CPUs), stack {result['stack']['name']} "
          f"({result['stack']['stages']} stages), {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
          f"one SET intervention, greedy, {args.repeats} repeats")
    for name, values in result["medians"].items():
        print(f"{name:>11}: first token {values['ttft_s'] * 1e3:8.1f} ms   decode {values['decode_tokens_per_s']:7.1f} "
              f"tokens/s   whole {values['total_s']:.3f} s")
    for row in result["comparisons"]:
        target = f"  (target <= {row['target']})" if "target" in row else ""
        print(f"{row['ratio']:7.3f}  {row['what']}{target}")


if __name__ == "__main__":
    main()
