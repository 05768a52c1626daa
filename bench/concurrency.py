"""Concurrent Generate streams with different interventions through a real gRPC server (continuous batching).

    python bench/concurrency.py --stack runs/demo/stack [--levels 1,2,4,8,16] [--new-tokens 32] [--json]
    python bench/concurrency.py --model tiny-random --stack random     # a random TopK stack, for smoke runs

Requests differ in prompt length and in what they ask for: no edit, SET / ADD / SCALE / CLAMP / ABLATE of
a feature, a steering vector, the DEFAULT branch, per-token features; greedy or seeded sampling. First
every request runs alone, one after the other (the unbatched reference: its tokens and the single-stream
figures; it is level 1); then for each level c the first c requests run at once, one thread per stream.
Reported, as ratios to the single-stream figures of the same run: aggregate tokens/s (all streams'
tokens over the wall time of the level) and p50/p95 of the time per token (gaps between one stream's
consecutive tokens, first token included from the request's start). Every batched stream's tokens are
checked against its unbatched run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import torch
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import featurewire_pb2_grpc as pb_grpc
from featurewire.v1 import types_pb2 as t
from hook_overhead import machine, prompt_ids
from serve_overhead import LoopThread, random_stack

from core.config import ModelConfig
from service.config import ServerConfig
from service.server import Server

OPS = (None, t.INTERVENTION_OP_SET, t.INTERVENTION_OP_ADD, "steer", t.INTERVENTION_OP_ABLATE, "default",
       t.INTERVENTION_OP_CLAMP, "features", t.INTERVENTION_OP_SCALE)


def start(model: str, stack: Path, max_batch: int, device: str = "auto", dtype: str = "auto"
          ) -> tuple[LoopThread, Server]:
    loop = LoopThread()

    async def build() -> Server:
        return Server(ModelConfig(name=model, device=device, dtype=dtype),
                      ServerConfig(host="127.0.0.1", port=0, metrics_port=0, stacks=(stack,), self_check=False,
                                   max_batch_size=max_batch, queue_size=max(64, max_batch)))

    server = loop.run(build())
    loop.run(server.start())
    return loop, server


def requests(server: Server, count: int, prompt_tokens: int, new_tokens: int) -> list[pb.GenerateRequest]:
    """`count` requests with different prompts (lengths prompt_tokens/2 .. prompt_tokens) and interventions."""
    host = server.host
    assert host is not None
    stack = next(iter(server.stacks.values()))
    stages = stack.stage_names
    ids = prompt_ids(host, prompt_tokens * (count + 1))[0].tolist()
    d = host.hookpoints.d_model
    out = []
    for i in range(count):
        length = prompt_tokens // 2 + (i * 7) % (prompt_tokens // 2 + 1)
        prompt = [ids[0]] + ids[1 + i * prompt_tokens: i * prompt_tokens + length]
        sampling = pb.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        if i % 3 == 1:
            sampling.temperature, sampling.top_k, sampling.seed = 0.8, 50, 1000 + i
        request = pb.GenerateRequest(stack=stack.name, prompt=t.Input(token_ids=t.TokenIds(ids=prompt)),
                                     sampling=sampling)
        op = OPS[i % len(OPS)]
        stage = stages[i % len(stages)]
        if op == "steer":
            request.steering_vectors.append(t.SteeringVector(
                hookpoint=stack.runtime.stages[0].hookpoint, values=[((j * 31 + i) % 17 - 8) / 8 for j in range(d)],
                scale=2.0))
        elif op == "default":
            request.with_default = True
            request.interventions.append(t.Intervention(stage=stage, feature=i, op=t.INTERVENTION_OP_SET, value=8.0))
        elif op == "features":
            request.decompose.CopyFrom(t.DecomposeOptions(top_k=8, include_error=True))
        elif op is not None:
            request.interventions.append(t.Intervention(stage=stage, feature=3 * i + 1, op=op, value=4.0,
                                                        lo=-1.0, hi=1.0))
        out.append(request)
    return out


def stream(stub: pb_grpc.FeaturewireStub, request: pb.GenerateRequest) -> dict[str, Any]:
    """Tokens per branch and the arrival time of every token."""
    started = time.perf_counter()
    tokens: dict[int, list[int]] = {}
    stamps = [started]
    for response in stub.Generate(request, timeout=3600):
        if response.HasField("token"):
            tokens.setdefault(response.token.branch, []).append(response.token.token_id)
            stamps.append(time.perf_counter())
    return {"tokens": tokens, "stamps": stamps}


def level(stub: pb_grpc.FeaturewireStub, batch: list[pb.GenerateRequest]) -> tuple[float, list[dict[str, Any]]]:
    """Run `batch` at once; (wall seconds, per-request results)."""
    results: list[dict[str, Any]] = [{} for _ in batch]

    def one(i: int) -> None:
        results[i] = stream(stub, batch[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(batch))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, results


def figures(wall: float, results: list[dict[str, Any]]) -> dict[str, float]:
    gaps = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:], strict=False)]
    tokens = sum(len(v) for r in results for v in r["tokens"].values())
    quantiles = statistics.quantiles(gaps, n=20)
    return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall, "p50_s": statistics.median(gaps),
            "p95_s": quantiles[18]}


def report(model: str, stack_arg: str, levels: list[int], prompt_tokens: int, new_tokens: int,
           device: str = "auto", dtype: str = "auto") -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        stack_dir = Path(stack_arg)
        if stack_arg == "random":
            from core.host.loading import load_host_model

            stack_dir = random_stack(load_host_model(ModelConfig(name=model, device=device, dtype=dtype)),
                                     Path(tmp) / "stack")
        loop, server = start(model, stack_dir, max(levels), device, dtype)
        try:
            stub = pb_grpc.FeaturewireStub(grpc.insecure_channel(server.target))
            batch = requests(server, max(levels), prompt_tokens, new_tokens)
            stream(stub, batch[0])  # warm-up
            alone = [level(stub, [request]) for request in batch]
            single = figures(sum(w for w, _ in alone), [r for _, rs in alone for r in rs])
            rows = []
            for c in levels:
                if c == 1:  # the baseline itself: every request alone
                    fig, same = single, [True] * len(alone)
                else:
                    fig_wall, results = level(stub, batch[:c])
                    fig = figures(fig_wall, results)
                    same = [r["tokens"] == a[1][0]["tokens"] for r, a in zip(results, alone, strict=False)]
                rows.append({"streams": c, **fig, "throughput_ratio": fig["tokens_per_s"] / single["tokens_per_s"],
                             "p50_ratio": fig["p50_s"] / single["p50_s"], "p95_ratio": fig["p95_s"] / single["p95_s"],
                             "identical": sum(same), "requests": len(same)})
            host = server.host
            assert host is not None
            where = machine(host)
        finally:
            loop.run(server.stop(0))
    return {"benchmark": "concurrency", "machine": where, "stack": stack_arg, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "single_stream": single, "levels": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--stack", default="runs/demo/stack", help="a stack directory, or 'random'")
    parser.add_argument("--levels", default="1,2,4,8,16", help="concurrent streams, comma-separated")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    levels = sorted({int(x) for x in args.levels.split(",")})
    result = report(args.model, args.stack, levels, args.prompt_tokens, args.new_tokens, args.device, args.dtype)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    m = result["machine"]
    print(f"{m['model']} on {m['device']} {m['dtype']} ({m['cpu']}, {m['torch_threads']} threads), prompts "
          f"{args.prompt_tokens // 2}-{args.prompt_tokens} tokens, {args.new_tokens} new tokens, mixed interventions")
    print(f"single stream: {result['single_stream']['tokens_per_s']:.2f} tokens/s (absolute, this machine only)")
    print("streams  tokens/s ratio  p50 time/token ratio  p95 ratio  identical to unbatched")
    for row in result["levels"]:
        print(f"{row['streams']:7d}  {row['throughput_ratio']:14.2f}  {row['p50_ratio']:20.2f}  "
              f"{row['p95_ratio']:9.2f}  {row['identical']}/{row['requests']}")


if __name__ == "__main__":
    main()
