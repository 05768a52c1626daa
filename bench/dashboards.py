"""Dashboard pass speed and memory, as ratios against a plain Hugging Face forward in the same run.

    python bench/dashboards.py --stack runs/demo/stack [--tokens 8192] [--repeats 3] [--json]

The baseline tokenizes and windows the same held-out documents into the same batches and runs the HF body over
the same layers (the layers up to the stack's last hookpoint; the pass stops there too), without hooks, SAEs or
statistics. Every repeat runs both, interleaved (alternating order); the report gives the median of the per-repeat
tokens/s ratios (the same tokens for both). Memory: the accumulators' state is measured after N and after 2N tokens
(it must not grow), and the process's peak RSS is reported after each.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from machine import machine_info

from core.host.host_model import HostModel
from core.stack.runtime import StackRuntime
from trainer.dashboards.accumulator import DashboardSettings
from trainer.dashboards.build import accumulate, finish, select_documents
from trainer.data.activations import batch_windows, iter_windows
from trainer.data.corpus import Document
from trainer.evaluation.held_out import open_held_out


@contextmanager
def truncated(host: HostModel, layers: int):
    """The HF body with only its first `layers` decoder layers (the plain baseline of an early-stopped pass)."""
    body = host.model.base_model
    full = body.layers
    body.layers = full[:layers]
    try:
        yield body
    finally:
        body.layers = full


def plain_pass(host: HostModel, documents: list[Document], context_length: int, batch_size: int,
               layers: int) -> int:
    """Tokenize, window and run the truncated HF body over every batch; returns the real tokens seen."""
    pad_id = host.tokenizer.pad_token_id if host.tokenizer.pad_token_id is not None else 0
    seen = 0
    with truncated(host, layers) as body, torch.inference_mode():
        for batch in batch_windows(iter_windows(host.tokenizer, documents, context_length), batch_size, pad_id):
            body(input_ids=batch.input_ids.to(host.device), attention_mask=batch.attention_mask.to(host.device),
                 use_cache=False)
            seen += int(batch.attention_mask.sum())
    return seen


def state_bytes(accumulators: list[Any]) -> int:
    return sum(v.numel() * v.element_size() for a in accumulators for v in a.state().values())


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(stack_dir: str, tokens: int, repeats: int, warmup: int, settings: DashboardSettings) -> dict[str, Any]:
    held = open_held_out(stack_dir)
    host, runtime = held.host, StackRuntime.from_loaded(held.stack)
    layers = max(host.hookpoints.resolve([s.hookpoint])[0].layer for s in runtime.stages) + 1
    documents = select_documents(host, held.documents, tokens)
    args = {"context_length": held.context_length, "batch_size": held.batch_size, "max_tokens": tokens}
    times: dict[str, list[float]] = {"plain": [], "dashboards": []}
    for repeat in range(warmup + repeats):
        for name in ("plain", "dashboards") if repeat % 2 == 0 else ("dashboards", "plain"):
            started = time.perf_counter()
            if name == "plain":
                plain_pass(host, documents, held.context_length, held.batch_size, layers)
            else:
                accumulators, stats = accumulate(host, runtime, documents, settings, progress=False, **args)
            if repeat >= warmup:
                times[name].append(time.perf_counter() - started)
    ratios = [p / d for p, d in zip(times["plain"], times["dashboards"], strict=True)]
    started = time.perf_counter()
    finish(host, runtime, accumulators, settings)
    finish_seconds = time.perf_counter() - started
    memory = []
    for n in (tokens, 2 * tokens):
        docs = select_documents(host, held.documents, n)
        accumulators, stats = accumulate(host, runtime, docs, settings, progress=False, **{**args, "max_tokens": n})
        memory.append({"tokens": stats["tokens"], "state_mib": state_bytes(accumulators) / 2**20,
                       "peak_rss_mib": peak_rss_mib()})
    return {
        "benchmark": "dashboards", "machine": {**machine_info(), "model": host.name, "device": str(host.device)},
        "stack": str(stack_dir), "stages": [f"{s.name} (d_sae {s.sae.d_sae}{', signed' if s.sae.signed else ''})"
                                            for s in runtime.stages],
        "layers_run": layers, "tokens": stats["tokens"], "documents": len(documents), "repeats": repeats,
        "warmup": warmup, "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "tokens_per_s": {k: stats["tokens"] / statistics.median(v) for k, v in times.items()},
        "ratio": statistics.median(ratios), "target": 0.8, "finish_seconds": finish_seconds, "memory": memory,
        "label_file_mib": stats.get("label_file_bytes", 0) / 2**20,
        "raw_seconds": times,
    }


def print_table(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"machine: {m['platform']}, {m['cpu']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), "
          f"device {m['device']}, torch {m['torch']}, python {m['python']}")
    print(f"model {m['model']}, stack {result['stack']}: {', '.join(result['stages'])}; {result['layers_run']} layers")
    print(f"{result['tokens']:,} tokens of {result['documents']} held-out documents (both passes); "
          f"{result['repeats']} interleaved repeats after {result['warmup']} warm-up; medians\n")
    for name in ("plain", "dashboards"):
        print(f"{name:<12}{result['median_seconds'][name]:>9.2f} s{result['tokens_per_s'][name]:>10.0f} tokens/s")
    print(f"\ndashboard pass / plain HF body, tokens/s: {result['ratio']:.3f} (target >= {result['target']})")
    print(f"finish (logit lens, neighbours, quantiles): {result['finish_seconds']:.1f} s")
    for row in result["memory"]:
        print(f"after {row['tokens']:>8,} tokens: accumulator state {row['state_mib']:.1f} MiB, "
              f"peak RSS {row['peak_rss_mib']:.0f} MiB")
    print(f"token labels' temporary firings file (deleted after the pass): {result['label_file_mib']:.1f} MiB "
          f"for {result['memory'][-1]['tokens']:,} tokens")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", default="runs/demo/stack", help="a stack directory (default runs/demo/stack)")
    parser.add_argument("--tokens", type=int, default=8192, help="held-out tokens per pass (default 8192)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of both passes (default 1)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--tokens and --repeats must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.stack, "stack.json").is_file():
        parser.error(f"{args.stack} is not a stack directory (make demo-stack builds runs/demo/stack)")
    result = report(args.stack, args.tokens, args.repeats, args.warmup, DashboardSettings())
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
