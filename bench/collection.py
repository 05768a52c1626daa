"""Activation collection speed, as a ratio against a plain Hugging Face forward over the same tokens in the same run.

    python bench/collection.py [--model default] [--tokens 4096] [--repeats 3] [--json]

"collect" is the trainer's whole collection path (`collect_activations`: tokenising and windowing the
documents, the forward pass with read hooks that stops after the last hookpoint, selecting the stored rows,
statistics, shard writes and their sha256) into a fresh directory. "plain" runs the HF body, truncated to
the layers up to the last hookpoint, on the same batches (built beforehand, so its time holds no
tokenisation), as `model(input_ids)` with no hooks and no attention mask, under `torch.inference_mode`.
Every repeat runs both, interleaved (alternating order); the report gives the median of the per-repeat
tokens/s ratios collect / plain (the same tokens for both; the target is >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from typing import Any

import torch
from dashboards import truncated
from machine import machine_info

from core.config import add_model_arguments, model_config_from_args
from core.host.devices import dtype_name
from core.host.host_model import HostModel
from core.host.loading import load_host_model
from trainer.data.activations import batch_windows, collect_activations, iter_windows
from trainer.data.corpus import Document, default_corpus

TARGET = 0.9


def default_hookpoints(host: HostModel) -> list[str]:
    """The residual stream after layers n/6, 2n/6, 3n/6, 4n/6 (blocks.3/6/9/12 of 18: the demo stack's)."""
    n = host.hookpoints.num_layers
    layers = sorted({n * i // 6 for i in range(1, 5)})
    return [f"blocks.{layer}.hook_resid_post" for layer in layers]


def plain_batches(host: HostModel, documents: list[Document], windows: int, context_length: int,
                  batch_size: int) -> list[torch.Tensor]:
    """The input ids (B, T) of the batches collection ran: the same windows, grouped and padded alike."""
    pad_id = host.tokenizer.pad_token_id if host.tokenizer.pad_token_id is not None else 0
    out, seen = [], 0
    for batch in batch_windows(iter_windows(host.tokenizer, documents, context_length), batch_size, pad_id):
        if seen >= windows:
            break
        out.append(batch.input_ids.to(host.device))
        seen += batch.num_windows
    return out


def plain_pass(host: HostModel, batches: list[torch.Tensor], layers: int) -> None:
    with truncated(host, layers) as body, torch.inference_mode():
        for ids in batches:
            body(input_ids=ids, use_cache=False)


def collect_pass(host: HostModel, documents: list[Document], hookpoints: list[str], args: dict[str, Any]) -> Any:
    with tempfile.TemporaryDirectory(prefix="featurewire-bench-") as tmp:
        return collect_activations(host, documents, hookpoints, out_dir=tmp, progress=False, **args)


def _synchronize(host: HostModel) -> None:
    if host.device.type == "cuda":
        torch.cuda.synchronize(host.device)


def report(host: HostModel, tokens: int, context_length: int, batch_size: int, repeats: int,
           warmup: int) -> dict[str, Any]:
    documents = default_corpus()
    random.Random(0).shuffle(documents)  # the trainer's seeded order (trainer/training/loop.py)
    hookpoints = default_hookpoints(host)
    layers = max(p.layer for p in host.hookpoints.resolve(hookpoints)) + 1
    args = {"context_length": context_length, "batch_size": batch_size, "max_tokens": tokens}
    manifest = collect_pass(host, documents, hookpoints, args)
    batches = plain_batches(host, documents, manifest.windows, context_length, batch_size)
    times: dict[str, list[float]] = {"plain": [], "collect": []}
    for repeat in range(warmup + repeats):
        for name in ("plain", "collect") if repeat % 2 == 0 else ("collect", "plain"):
            _synchronize(host)
            started = time.perf_counter()
            if name == "plain":
                plain_pass(host, batches, layers)
            else:
                collect_pass(host, documents, hookpoints, args)
            _synchronize(host)
            if repeat >= warmup:
                times[name].append(time.perf_counter() - started)
    stored = manifest.total_tokens
    return {
        "benchmark": "collection",
        "machine": {**machine_info(), "model": host.name, "device": str(host.device), "dtype": dtype_name(host.dtype),
                    "gpu": torch.cuda.get_device_name(host.device) if host.device.type == "cuda" else None},
        "hookpoints": hookpoints, "layers_run": layers, "layers": host.hookpoints.num_layers,
        "stored_tokens": stored, "model_tokens": sum(ids.numel() for ids in batches), "windows": manifest.windows,
        "batches": len(batches), "context_length": context_length, "batch_size": batch_size,
        "repeats": repeats, "warmup": warmup,
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "tokens_per_s": {k: stored / statistics.median(v) for k, v in times.items()},
        "ratio": statistics.median(p / c for p, c in zip(times["plain"], times["collect"], strict=True)),
        "target": TARGET, "raw_seconds": times,
    }


def print_table(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"machine: {m['platform']}, {m['cpu']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), "
          f"device {m['device']}{' ' + m['gpu'] if m['gpu'] else ''}, dtype {m['dtype']}, torch {m['torch']}, "
          f"python {m['python']}")
    print(f"model {m['model']}: {', '.join(result['hookpoints'])}; {result['layers_run']} of {result['layers']} "
          f"layers run")
    print(f"{result['stored_tokens']:,} stored tokens ({result['model_tokens']:,} model positions with BOS and "
          f"padding) in {result['batches']} batches of {result['batch_size']} x <= {result['context_length']}; "
          f"{result['repeats']} interleaved repeats after {result['warmup']} warm-up; medians\n")
    for name in ("plain", "collect"):
        print(f"{name:<10}{result['median_seconds'][name]:>9.2f} s{result['tokens_per_s'][name]:>10.0f} tokens/s")
    print(f"\ncollection / plain HF body, tokens/s: {result['ratio']:.3f} (target >= {result['target']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--tokens", type=int, default=4096, help="stored tokens per pass (default 4096)")
    parser.add_argument("--context-length", type=int, default=128, help="window length (default 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of both passes (default 1)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if min(args.tokens, args.repeats, args.context_length, args.batch_size) < 1 or args.warmup < 0:
        parser.error("--tokens, --repeats, --context-length and --batch-size must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    host = load_host_model(model_config_from_args(args, os.environ))
    result = report(host, args.tokens, args.context_length, args.batch_size, args.repeats, args.warmup)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
