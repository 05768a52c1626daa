"""SAE training throughput per architecture, against the machine's fp32 matmul peak measured in the same run.

    python bench/train_throughput.py [--d-in 640] [--width 4096] [--batch 1024] [--steps 20] [--repeats 3] [--json]
    python bench/train_throughput.py --device cuda --dtype bfloat16      # on a GPU: SAE, batches and matmuls in bf16

Each repeat times `steps` calls of `trainer.training.optimization.train_step` for every architecture and one round of
matmuls (the SAE's encode and decode shapes and a large square one), interleaved, with the order reversed on
every other repeat so that drift on a shared machine hits all alike. Inputs are N(0, 1) of shape (batch, d_in),
so E‖x‖² = d_in as in training; no latent is marked dead, so AuxK costs nothing (as early in a healthy run).
Achieved GFLOP/s counts the FLOPs a step needs (`flops_per_ndh`): the dense matmuls, and for TopK/BatchTopK,
which decode and backpropagate through their k active latents only, the sparse products at 2·N·k·d each
instead of the dense matmuls they replace. The ratio to the peak is the median of the per-repeat ratios;
tokens/s and the speed relative to relu (same run) are the numbers to compare across architectures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from machine import machine_info
from torch.utils.flop_counter import FlopCounterMode

from core.sae import ARCHITECTURES, SAEConfig, build_sae
from trainer.training.optimization import make_optimizer, train_step

# Dense matmul FLOPs of one training step in units of N·d·H (N tokens, d = d_in, H = width). Each (N×d)@(d×H)
# product costs 2·N·d·H forward and 2× that backward (grad of the input and of the weight).
# relu/jumprelu: encode + decode = 4 forward, 8 backward.
# gated/sa_gsae: the magnitude path reuses the gate's projection (no second encoder matmul), but the auxiliary
# reconstruction decodes once more through a frozen W_dec: 6 forward, backward 8 + 2 (input grad only).
# topk/batchtopk: only the encoder's forward matmul is dense (2); the decode, its two gradients and the encoder's
# weight gradient go through the N·k active entries (SPARSE_PRODUCTS of 2·N·k·d each, core/sae/sparse_decode.py),
# and the input needs no gradient.
# Every run checks the dense part against torch's FlopCounterMode on one warm-up step (it does not count the
# sparse products) and reports what it counted.
DENSE_FLOPS_PER_NDH = {"relu": 12, "topk": 2, "batchtopk": 2, "jumprelu": 12, "gated": 16, "sa_gsae": 16}
SPARSE_PRODUCTS = {"topk": 4, "batchtopk": 4}
SQUARE = 2048


def flops_per_ndh(arch: str, k: int, width: int) -> float:
    """FLOPs a training step needs, in units of N·d·H."""
    return DENSE_FLOPS_PER_NDH[arch] + 2 * SPARSE_PRODUCTS.get(arch, 0) * k / width


def sync() -> None:
    """Wait for queued GPU work (a no-op on CPU), so timings cover the work and not its launch."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], calls: int) -> float:
    """Seconds per call of `fn` over `calls` calls."""
    sync()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - started) / calls


def matmul_rates(batch: int, d_in: int, width: int, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """GFLOP/s of matmuls in `dtype`: the encode and decode shapes of the SAE, and a SQUARE³ one."""
    gen = torch.Generator().manual_seed(1)
    shapes = {"encode": (batch, d_in, width), "decode": (batch, width, d_in), "square": (SQUARE,) * 3}
    rates = {}
    for name, (m, k, n) in shapes.items():
        a = torch.randn(m, k, generator=gen).to(device, dtype)
        b = torch.randn(k, n, generator=gen).to(device, dtype)
        once = timed(lambda a=a, b=b: a @ b, 1)
        calls = max(2, int(0.5 / once))  # about half a second per shape
        rates[name] = 2 * m * k * n / timed(lambda a=a, b=b: a @ b, calls) / 1e9
    return rates


def make_step(architecture: str, d_in: int, width: int, batches: list[torch.Tensor]) -> Callable[[], None]:
    """Build a fresh SAE and its optimiser; each call of the result runs one train_step on the next batch."""
    sae = build_sae(SAEConfig(architecture=architecture, d_in=d_in, d_sae=width)).to(batches[0].device,
                                                                                      batches[0].dtype)
    sae.init_b_dec_(batches[0])
    optimizer = make_optimizer(sae, lr=1e-4)
    dead = torch.zeros(width, dtype=torch.bool, device=batches[0].device)
    state = {"i": 0}

    def step() -> None:
        state["i"] += 1
        train_step(sae, optimizer, batches[state["i"] % len(batches)], dead_mask=dead)

    return step


def run(d_in: int, width: int, batch: int, steps: int, repeats: int, device: str = "cpu",
        dtype: str = "float32") -> dict[str, Any]:
    """Measure everything interleaved and return one JSON-able dict."""
    gen = torch.Generator().manual_seed(0)
    kind = getattr(torch, dtype)
    batches = [torch.randn(batch, d_in, generator=gen).to(device, kind) for _ in range(4)]
    steps_by_arch = {arch: make_step(arch, d_in, width, batches) for arch in ARCHITECTURES}
    k = SAEConfig(architecture="topk", d_in=d_in, d_sae=width).k
    flops = {arch: flops_per_ndh(arch, k, width) for arch in ARCHITECTURES}
    counted: dict[str, float] = {}
    for arch, step in steps_by_arch.items():  # warm-up: allocator, Adam state, thread pool; count FLOPs
        step()
        with FlopCounterMode(display=False) as counter:
            step()
        counted[arch] = counter.get_total_flops() / (batch * d_in * width)
    matmul_rates(batch, d_in, width, device, kind)
    names = [*ARCHITECTURES, "matmul"]
    seconds: dict[str, list[float]] = {arch: [] for arch in ARCHITECTURES}
    rates: list[dict[str, float]] = []
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            if name == "matmul":
                rates.append(matmul_rates(batch, d_in, width, device, kind))
            else:
                seconds[name].append(timed(steps_by_arch[name], steps))
    peaks = [max(r.values()) for r in rates]
    ndh = batch * d_in * width
    results = {}
    for arch in ARCHITECTURES:
        gflops = [flops[arch] * ndh / s / 1e9 for s in seconds[arch]]
        results[arch] = {
            "flops_per_step": flops[arch] * ndh,
            "seconds_per_step": statistics.median(seconds[arch]),
            "tokens_per_s": batch / statistics.median(seconds[arch]),
            "vs_relu": statistics.median(r / s for r, s in zip(seconds["relu"], seconds[arch], strict=True)),
            "gflops": statistics.median(gflops),
            "ratio_to_peak": statistics.median(g / p for g, p in zip(gflops, peaks, strict=True)),
        }
    return {
        "benchmark": "train_throughput",
        "machine": {**machine_info(), "device": device, "dtype": dtype,
                    "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None},
        "d_in": d_in, "width": width, "k": k, "batch": batch, "steps": steps, "repeats": repeats,
        "flops_per_ndh": flops,
        "dense_flops_per_ndh": DENSE_FLOPS_PER_NDH,
        "counted_flops_per_ndh": counted,
        "matmul_gflops": {name: statistics.median(r[name] for r in rates) for name in rates[0]},
        "peak_gflops": statistics.median(peaks),
        "architectures": results,
        "raw_seconds_per_step": seconds,
        "raw_matmul_gflops": rates,
    }


def print_table(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"machine: {m['platform']}, {m['cpu']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), "
          f"torch {m['torch']}, python {m['python']}; device {m['device']}{' ' + m['gpu'] if m['gpu'] else ''}")
    print(f"SAE: d_in {result['d_in']}, width {result['width']}, k {result['k']}, batch {result['batch']} tokens, "
          f"{m['dtype']}; "
          f"{result['steps']} steps x {result['repeats']} interleaved repeats; medians")
    mm = result["matmul_gflops"]
    print(f"{m['dtype']} matmul GFLOP/s: encode shape {mm['encode']:.1f}, decode shape {mm['decode']:.1f}, "
          f"square {SQUARE}³ {mm['square']:.1f}; peak (best per repeat) {result['peak_gflops']:.1f}\n")
    print(f"{'architecture':<13}{'FLOPs/step':>12}{'s/step':>9}{'tokens/s':>10}{'x relu':>8}{'GFLOP/s':>9}{'/peak':>7}")
    for arch, r in result["architectures"].items():
        flops = f"{result['flops_per_ndh'][arch]:.4g}·NdH"
        print(f"{arch:<13}{flops:>12}{r['seconds_per_step']:>9.3f}{r['tokens_per_s']:>10.0f}{r['vs_relu']:>8.2f}"
              f"{r['gflops']:>9.1f}{r['ratio_to_peak']:>7.2f}")
    print("\nFLOPs/step: what a step needs (N tokens, d = d_in, H = width): dense matmuls at 2·NdH forward, 2x "
          "backward; topk/batchtopk: one dense encoder matmul plus 4 sparse products of 2·N·k·d over the active "
          "latents. x relu: speed relative to relu in the same repeat. Dense part checked against torch's "
          "FlopCounterMode")
    for arch, counted in result["counted_flops_per_ndh"].items():
        if abs(counted - result["dense_flops_per_ndh"][arch]) > 0.01:  # matrix-vector products (2·d·H) aside
            print(f"warning: torch counted {counted:.2f}·NdH for {arch}; update DENSE_FLOPS_PER_NDH")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=640, help="activation width (default 640, Gemma 3 270M)")
    parser.add_argument("--width", type=int, default=4096, help="SAE latents d_sae (default 4096)")
    parser.add_argument("--batch", type=int, default=1024, help="tokens per step (default 1024)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per architecture and repeat (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="SAE, batch and matmul dtype (default float32)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if min(args.d_in, args.width, args.batch, args.steps, args.repeats) < 1:
        parser.error("--d-in, --width, --batch, --steps and --repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.d_in, args.width, args.batch, args.steps, args.repeats, args.device, args.dtype)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
