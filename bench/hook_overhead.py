"""Hook overhead of the host model runtime, as ratios against a plain Hugging Face forward in the same run.

    python bench/hook_overhead.py [--model default] [--tokens 256] [--repeats 5] [--json]

Every repeat runs each variant once, interleaved (the order alternates between repeats, so slow drift
of a shared machine hits all variants alike); the report gives median seconds per variant and the median
of the per-repeat ratios. Plain HF calls use `use_cache=False`, like `HostModel.forward`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pydoc_data.topics import topics
from typing import Any

import torch
import transformers
from machine import machine_info

from core.config import add_model_arguments, model_config_from_args
from core.host.devices import dtype_name
from core.host.hooks import add_vector
from core.host.host_model import HostModel
from core.host.loading import load_host_model


def prompt_ids(host: HostModel, tokens: int) -> torch.Tensor:
    """(1, tokens) ids of English prose that ships with Python (`pydoc_data.topics`), batch 1."""
    text = ""
    for key in sorted(topics):
        text += topics[key]
        if len(text) > 8 * tokens:  # a token is ~4 characters of this prose; tokenize a safe prefix
            ids = host.encode(text)
            if ids.shape[1] >= tokens:
                return ids[:, :tokens]
    raise SystemExit(f"pydoc_data.topics has fewer than {tokens} tokens; ask for fewer --tokens")


def variants(host: HostModel, ids: torch.Tensor) -> tuple[dict[str, Callable[[], Any]], int, int]:
    """The timed calls by name, the early-stop layer and the write layer."""
    model, num_layers = host.model, host.hookpoints.num_layers
    stop_layer = max(num_layers // 3 - 1, 0)  # blocks.5 of 18 layers
    write_layer = min(stop_layer + 1, num_layers - 1)  # blocks.6 of 18 layers
    every_point = host.hookpoints.names()
    generator = torch.Generator().manual_seed(0)
    vector = torch.randn(host.hookpoints.d_model, generator=generator).to(host.device, host.dtype)
    steer = {f"blocks.{write_layer}.hook_resid_post": add_vector(vector)}
    calls: dict[str, Callable[[], Any]] = {
        # ordered so that each variant runs right next to the baseline that it is divided by
        "early_stop": lambda: host.forward(ids, reads=[f"blocks.{stop_layer}.hook_resid_post"]),
        "hf_body": lambda: model.base_model(input_ids=ids, use_cache=False),
        "read_all": lambda: host.forward(ids, reads=every_point),
        "hf_logits": lambda: model(input_ids=ids, use_cache=False),
        "write_logits": lambda: host.forward(ids, writes=steer, logits=True),
    }
    return calls, stop_layer, write_layer


def measure(calls: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: torch.device
            ) -> dict[str, list[float]]:
    """Seconds per call for every variant and repeat, interleaved; the warm-up runs are not kept."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for repeat in range(warmup + repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            with torch.inference_mode():
                calls[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if repeat >= warmup:
                times[name].append(time.perf_counter() - started)
    return times


def median_ratio(times: dict[str, list[float]], variant: str, baseline: str) -> float:
    """Median over repeats of variant/baseline measured in the same repeat."""
    return statistics.median(v / b for v, b in zip(times[variant], times[baseline], strict=True))


def machine(host: HostModel) -> dict[str, Any]:
    """Where the numbers were measured."""
    summary = host.summary()
    return {
        **machine_info(),
        "transformers": transformers.__version__,
        "device": str(host.device),
        "gpu": torch.cuda.get_device_name(host.device) if host.device.type == "cuda" else None,
        "dtype": dtype_name(host.dtype),
        "model": host.name,
        "model_type": summary.model_type,
        "layers": summary.num_layers,
        "d_model": summary.d_model,
        "vocab": summary.vocab_size,
        "hookpoints": summary.num_hookpoints,
    }


def logits_flop_ratio(host: HostModel) -> float:
    """(body + unembedding) / body in weight-matmul FLOPs per token: the floor for `hf_logits / hf_body`."""
    model = host.model
    embeddings = {id(m.weight): m.weight.numel() for m in (model.get_input_embeddings(),
                                                            model.get_output_embeddings())}
    body = sum(p.numel() for p in model.parameters()) - sum(embeddings.values())
    return 1 + model.config.vocab_size * host.hookpoints.d_model / body


def report(host: HostModel, tokens: int, repeats: int, warmup: int) -> dict[str, Any]:
    """Run the benchmark and return everything as one JSON-able dict."""
    ids = prompt_ids(host, tokens)
    calls, stop_layer, write_layer = variants(host, ids)
    layers = host.hookpoints.num_layers
    times = measure(calls, repeats, warmup, host.device)
    seconds = {name: statistics.median(values) for name, values in times.items()}
    fastest = {name: min(values) for name, values in times.items()}
    comparisons = [
        {"what": f"read hooks at all {len(host.hookpoints)} hookpoints vs HF body",
         "variant": "read_all", "baseline": "hf_body", "ideal": 1.0},
        {"what": f"early stop: read blocks.{stop_layer}.hook_resid_post only vs HF body",
         "variant": "early_stop", "baseline": "hf_body", "ideal": (stop_layer + 1) / layers},
        {"what": "HF forward with logits vs HF body (unembedding share)",
         "variant": "hf_logits", "baseline": "hf_body", "ideal": logits_flop_ratio(host)},
        {"what": f"write add_vector at blocks.{write_layer}.hook_resid_post + logits vs HF forward",
         "variant": "write_logits", "baseline": "hf_logits", "ideal": 1.0},
    ]
    for row in comparisons:
        row["ratio"] = median_ratio(times, row["variant"], row["baseline"])
    return {
        "benchmark": "hook_overhead",
        "machine": machine(host),
        "tokens": tokens,
        "batch": 1,
        "repeats": repeats,
        "warmup": warmup,
        "median_seconds": seconds,
        "min_seconds": fastest,
        "baseline_tokens_per_s": tokens / seconds["hf_body"],
        "comparisons": comparisons,
        "raw_seconds": times,
    }


def print_table(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"machine: {m['platform']}, {m['cpu']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), "
          f"device {m['device']}{' ' + m['gpu'] if m['gpu'] else ''}, dtype {m['dtype']}, "
          f"torch {m['torch']}, transformers {m['transformers']}, python {m['python']}")
    print(f"model: {m['model']} ({m['model_type']}, {m['layers']} layers, d_model {m['d_model']}, "
          f"vocab {m['vocab']}, {m['hookpoints']} hookpoints)")
    print(f"input: batch 1 x {result['tokens']} tokens; {result['repeats']} interleaved repeats after "
          f"{result['warmup']} warm-up; medians\n")
    print(f"{'variant':<14}{'median s':>10}{'min s':>10}")
    for name, value in result["median_seconds"].items():
        print(f"{name:<14}{value:>10.4f}{result['min_seconds'][name]:>10.4f}")
    print(f"\nbaseline (hf_body): {result['baseline_tokens_per_s']:.0f} tokens/s\n")
    print(f"{'ratio':<28}{'measured':>9}{'ideal':>8}  comparison")
    for row in result["comparisons"]:
        ideal = "-" if row["ideal"] is None else f"{row['ideal']:.3f}"
        label = f"{row['variant']} / {row['baseline']}"
        print(f"{label:<28}{row['ratio']:>9.3f}{ideal:>8}  {row['what']}")
    print("\nideal: 1 = no hook overhead; early stop: share of layers run; logits: weight-matmul FLOP ratio")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--tokens", type=int, default=256, help="prompt length, batch 1 (default 256)")
    parser.add_argument("--repeats", type=int, default=5, help="timed interleaved repeats (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of every variant (default 1)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--tokens and --repeats must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    host = load_host_model(model_config_from_args(args, os.environ))
    result = report(host, args.tokens, args.repeats, args.warmup)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
