"""Serving overhead, as ratios against plain baselines measured in the same run (issue: the gRPC service).

    python bench/serve_overhead.py --stack runs/demo/stack [--tokens 128] [--new-tokens 32] [--repeats 5] [--json]
    python bench/serve_overhead.py --model tiny-random --stack random     # a random TopK stack, for smoke runs

1. Decompose (every stage, top-k 32, error norms) vs a plain HF body forward of the same tokens, with the
   FLOP floor of docs/methods.md §F (each stage ≈ 4·d·H FLOPs per token against ≈ 2·non-embedding parameters).
2. Steered generation (a SET intervention, greedy, N new tokens) vs plain HF `generate`, as a tokens/s ratio.
3. Decompose through a real gRPC server on loopback (generated stubs) vs the direct engine call it wraps.
4. Thread scaling (with more than one torch thread): steered generation and HF `generate` at 1 thread, so
   that each one's 1 -> default-thread speed-up is printed, and featurewire's over HF's (target 0.9).
Every direct call runs on the server's engine thread, as the server runs all its torch work there (a
second thread running torch would start a second OpenMP pool and change how both use the cores:
service/engine/execution/threads.py); the thread count is the engine's (`--threads`, else chosen from the
machine as the server does). Variants run interleaved per repeat (order alternating) and ratios are medians
of per-repeat ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import torch
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import featurewire_pb2_grpc as pb_grpc
from featurewire.v1 import types_pb2 as t
from hook_overhead import machine, measure, prompt_ids

from core.config import ModelConfig
from core.host.host_model import HostModel
from core.sae import SAEConfig, build_sae
from core.stack.identity import HostModelIdentity
from core.stack.writer import StageSpec, write_stack
from service.config import ServerConfig
from service.engine.contract.specs import DecomposeSpec, GenerateSpec, InterventionSpec, Op, SamplingSpec
from service.engine.operations.decompose import decompose_events
from service.engine.operations.generation import generate_events
from service.engine.stacks.served import ServedStack
from service.server import Server


def random_stack(host: HostModel, out: Path, width_factor: int = 4) -> Path:
    """A TopK stack with random weights at four evenly spaced resid_post hookpoints (costs what a trained one
    costs; its codes mean nothing)."""
    layers, d = host.hookpoints.num_layers, host.hookpoints.d_model
    picks = sorted({max(0, round(layers * f) - 1) for f in (0.2, 0.4, 0.6, 0.8)})
    stages = [StageSpec(build_sae(SAEConfig("topk", d, width_factor * d, k=min(32, width_factor * d))),
                        f"blocks.{i}.hook_resid_post") for i in picks]
    return write_stack(out, "random", HostModelIdentity.from_model(host.model, host.name), stages, overwrite=True)


def body_parameters(host: HostModel) -> int:
    model = host.model
    embeddings = {id(m.weight): m.weight.numel() for m in (model.get_input_embeddings(),
                                                            model.get_output_embeddings())}
    return sum(p.numel() for p in model.parameters()) - sum(embeddings.values())


def decompose_floor(host: HostModel, stack: ServedStack) -> dict[str, float]:
    """FLOP floors: (body + stages) / body, and the same against the body up to the last stage's layer."""
    stage_flops = sum(4 * s.sae.d_in * s.sae.d_sae for s in stack.runtime.stages)
    body = 2 * body_parameters(host)
    last = max(host.hookpoints.get(s.hookpoint).layer for s in stack.runtime.stages) + 1
    partial = body * last / host.hookpoints.num_layers
    return {"vs_full_body": 1 + stage_flops / body, "vs_body_to_last_stage": (partial + stage_flops) / body,
            "last_stage_layers": last}


class LoopThread:
    """The server's event loop in a daemon thread (grpc.aio wants one loop)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro: Any, timeout: float = 900) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def start_server(model: str, stack: Path, device: str = "auto", dtype: str = "auto",
                 threads: int = 0) -> tuple[LoopThread, Server]:
    loop = LoopThread()

    async def build() -> Server:
        return Server(ModelConfig(name=model, device=device, dtype=dtype),
                      ServerConfig(host="127.0.0.1", port=0, metrics_port=0, stacks=(stack,), self_check=False,
                                   threads=threads))

    server = loop.run(build())
    loop.run(server.start())
    return loop, server


def on_engine(loop: LoopThread, server: Server, fn: Callable[[], Any], threads: int | None = None
              ) -> Callable[[], Any]:
    """`fn` as a job on the server's engine thread (at `threads` torch threads for this call when given)."""
    engine = server.engine
    assert engine is not None

    def job() -> Any:
        if threads is None:
            return fn()
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(engine.threads)

    return lambda: loop.run(engine.call(job, deadline=None, method="bench"))


def calls(loop: LoopThread, server: Server, ids: torch.Tensor, new_tokens: int) -> dict[str, Callable[[], Any]]:
    host, engine = server.host, server.engine
    assert host is not None and engine is not None
    stack = next(iter(server.stacks.values()))
    token_ids = tuple(ids[0].tolist())
    everything = tuple(range(len(stack.runtime.stages)))
    decompose = DecomposeSpec(stack.name, token_ids, everything, top_k=32, include_error=True, chunk_tokens=32)
    feature = 0
    steer = InterventionSpec(stage=len(everything) // 2, feature=feature, op=Op.SET, value=10.0)
    sampling = SamplingSpec(max_new_tokens=new_tokens, ignore_eos=True)
    steered = GenerateSpec(stack.name, token_ids, sampling, interventions=(steer,))
    channel = grpc.insecure_channel(server.target)
    stub = pb_grpc.FeaturewireStub(channel)
    request = pb.DecomposeRequest(stack=stack.name, input=t.Input(token_ids=t.TokenIds(ids=list(token_ids))),
                                  options=t.DecomposeOptions(top_k=32, include_error=True), chunk_tokens=32)
    model = host.model

    def steered_generate() -> Any:
        return list(generate_events(host, stack, steered))

    def hf_generate() -> Any:
        return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=host.tokenizer.pad_token_id)

    timed = {
        "decompose": on_engine(loop, server, lambda: list(decompose_events(host, stack, decompose))),
        "hf_body": on_engine(loop, server, lambda: model.base_model(input_ids=ids, use_cache=False)),
        "steered_generate": on_engine(loop, server, steered_generate),
        "hf_generate": on_engine(loop, server, hf_generate),
        "grpc_decompose": lambda: list(stub.Decompose(request, timeout=600)),
        "direct_decompose": on_engine(loop, server, lambda: list(decompose_events(host, stack, decompose))),
    }
    if engine.threads > 1:
        timed["steered_generate_1_thread"] = on_engine(loop, server, steered_generate, threads=1)
        timed["hf_generate_1_thread"] = on_engine(loop, server, hf_generate, threads=1)
    return timed


def report(model: str, stack_arg: str, tokens: int, new_tokens: int, repeats: int, warmup: int,
           device: str = "auto", dtype: str = "auto", threads: int = 0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        stack_dir = Path(stack_arg)
        if stack_arg == "random":
            from core.host.loading import load_host_model

            stack_dir = random_stack(load_host_model(ModelConfig(name=model, device=device, dtype=dtype)),
                                     Path(tmp) / "stack")
        loop, server = start_server(model, stack_dir, device, dtype, threads)
        try:
            host, engine = server.host, server.engine
            assert host is not None and engine is not None
            engine_threads = engine.threads
            ids = prompt_ids(host, tokens)
            timed = calls(loop, server, ids, new_tokens)
            times = measure(timed, repeats, warmup, host.device)
            stack = next(iter(server.stacks.values()))
            floor = decompose_floor(host, stack)
        finally:
            loop.run(server.stop(0))
    ratio = {name: statistics.median(v / b for v, b in zip(times[name], times[base], strict=True))
             for name, base in (("decompose", "hf_body"), ("steered_generate", "hf_generate"),
                                ("grpc_decompose", "direct_decompose"),
                                ("steered_generate_1_thread", "steered_generate"),
                                ("hf_generate_1_thread", "hf_generate")) if name in times}
    scaling = []
    if "steered_generate_1_thread" in ratio:
        scaling = [
            {"what": f"steered generation: 1 -> {engine_threads} threads speed-up",
             "ratio": ratio["steered_generate_1_thread"], "target": None},
            {"what": f"HF generate: 1 -> {engine_threads} threads speed-up", "ratio": ratio["hf_generate_1_thread"],
             "target": None},
            {"what": f"steered generation's 1 -> {engine_threads} threads speed-up / HF generate's",
             "ratio": ratio["steered_generate_1_thread"] / ratio["hf_generate_1_thread"], "target": 0.9}]
    return {
        "benchmark": "serve_overhead", "machine": {**machine(host), "engine_threads": engine_threads},
        "load_average": [round(x, 2) for x in os.getloadavg()], "tokens": tokens, "new_tokens": new_tokens,
        "repeats": repeats, "stack": {"path": str(stack_arg), "stages": [
            {"hookpoint": s.hookpoint, "architecture": s.sae.cfg.architecture, "d_sae": s.sae.d_sae,
             "residual": s.residual_of is not None} for s in stack.runtime.stages]},
        "median_seconds": {name: statistics.median(values) for name, values in times.items()},
        "comparisons": [
            {"what": "Decompose (all stages, top-k 32, error norms) / HF body forward", "ratio": ratio["decompose"],
             "target": 1.25, "flop_floor": floor["vs_full_body"],
             "flop_floor_early_stop": floor["vs_body_to_last_stage"]},
            {"what": "steered generation tokens/s / HF generate tokens/s",
             "ratio": 1 / ratio["steered_generate"], "target": 0.9},
            {"what": f"gRPC Decompose of {tokens} tokens / direct engine call", "ratio": ratio["grpc_decompose"],
             "target": 1.1},
            *scaling,
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--stack", required=True, help="a stack directory, or 'random'")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    parser.add_argument("--threads", type=int, default=0,
                        help="the engine's torch threads (default 0: chosen from the machine, as the server does)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = report(args.model, args.stack, args.tokens, args.new_tokens, args.repeats, args.warmup, args.device,
                    args.dtype, args.threads)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    m = result["machine"]
    print(f"{m['model']} on {m['device']} {m['dtype']} ({m['cpu']}, {m['cpu_count']} CPUs, engine "
          f"{m['engine_threads']} torch threads), {args.tokens} tokens, {args.new_tokens} new tokens, "
          f"{args.repeats} repeats, load average {result['load_average']}")
    for row in result["comparisons"]:
        extra = f"  (FLOP floor {row['flop_floor']:.3f})" if "flop_floor" in row else ""
        print(f"{row['ratio']:7.3f}  target {row['target']}  {row['what']}{extra}")


if __name__ == "__main__":
    main()
