"""EncodeActivations backends, as ratios measured in the same run (issue: ONNX export and activation-only serving).

    python bench/onnx_encode.py --stack runs/demo/stack [--rows 512] [--repeats 5] [--json]
    python bench/onnx_encode.py --stack random --model tiny-random --rows 64 --repeats 1   # smoke run

1. Encode throughput per stage, CPU: ONNX Runtime (the stage's exported graph: encode, top-k 32 by |z|, L0,
   error norms) vs the torch stack runtime doing the same work (what the full server runs), in vectors/s,
   both with the same number of threads, on the same random activations at the SAE's scale.
2. Memory: resident set (VmRSS after warm-up and traffic, and the peak VmHWM) of a real
   `featurewire-serve serve --no-model` process vs a full `featurewire-serve serve` of the same stack.
3. gRPC EncodeActivations throughput of those two servers (raw float32 batches on loopback), vectors/s.
A stack without ONNX graphs is copied to a temporary directory and exported there (random-activation parity
only); `random` writes a random two-stage ReSAE SA-GSAE stack at the model's width.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import torch
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import featurewire_pb2_grpc as pb_grpc
from featurewire.v1 import types_pb2 as t
from grpc_health.v1 import health_pb2, health_pb2_grpc
from machine import machine_info

from core.sae import SAEConfig, build_sae, top_k_by_magnitude
from core.stack.affine import AffineMap
from core.stack.identity import HostModelIdentity
from core.stack.reader import read_stack
from core.stack.runtime import StackRuntime
from core.stack.writer import StageSpec, write_stack
from trainer.interop.onnx_export import export_stack
from trainer.interop.onnx_parity import random_inputs

ROOT = Path(__file__).resolve().parents[1]
TOP_K = 32


def random_stack(model: str, out: Path, width_factor: int = 4) -> Path:
    """Two SA-GSAE stages at blocks 1 and 2 resid_post, the second residualized on the first (random weights)."""
    from core.config import ModelConfig
    from core.host.loading import load_host_model

    host = load_host_model(ModelConfig(name=model, device="cpu"))
    d = host.hookpoints.d_model
    affine = AffineMap(torch.eye(d), torch.zeros(d), 1.0, 0.5, 1.0)
    specs = [StageSpec(build_sae(SAEConfig("sa_gsae", d, width_factor * d)), "blocks.1.hook_resid_post"),
             StageSpec(build_sae(SAEConfig("sa_gsae", d, width_factor * d)), "blocks.2.hook_resid_post",
                       residual_of=0, affine=affine)]
    return write_stack(out, "random", HostModelIdentity.from_model(host.model, host.name), specs)


def with_graphs(stack_dir: Path, tmp: Path) -> Path:
    """The stack itself when every stage has a graph, else an exported copy."""
    manifest = json.loads((stack_dir / "stack.json").read_text())
    if all("onnx" in s for s in manifest["stages"]):
        return stack_dir
    copy = shutil.copytree(stack_dir, tmp / "exported")
    export_stack(copy, random_rows=256)
    return copy


def kernel_times(stack_dir: Path, rows: int, repeats: int, threads: int) -> list[dict[str, Any]]:
    """Per stage: median seconds per batch of `rows` for ONNX Runtime and torch, interleaved repeats."""
    torch.set_num_threads(threads)
    stack = read_stack(stack_dir)
    runtime = StackRuntime.from_loaded(stack)
    manifest = json.loads((stack_dir / "stack.json").read_text())
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads would starve torch
    out = []
    for index, stage in enumerate(runtime.stages):
        record = manifest["stages"][index]["onnx"]
        session = ort.InferenceSession(str(stack_dir / record["file"]), options, providers=["CPUExecutionProvider"])
        h, prev = random_inputs(runtime, index, rows, seed=index)
        feeds = {"activations": h.numpy(), "error_rows": np.arange(rows)}
        feeds |= {"previous": prev.numpy()} if prev is not None else {}
        feeds |= {"top_k": np.array([TOP_K])} if record["codes"] == "top_k" else {}

        def torch_call(stage=stage, h=h, prev=prev) -> Any:
            result = runtime.run_stage(stage, h, prev)
            return top_k_by_magnitude(result.codes, TOP_K), (result.codes != 0).sum(-1), result.error_norm()

        calls = {"onnxruntime": lambda s=session, f=feeds: s.run(None, f), "torch": torch_call}
        times: dict[str, list[float]] = {name: [] for name in calls}
        for repeat in range(repeats + 1):  # the first round warms up and is not kept
            for name in calls if repeat % 2 == 0 else reversed(list(calls)):
                started = time.perf_counter()
                with torch.inference_mode():
                    calls[name]()
                if repeat:
                    times[name].append(time.perf_counter() - started)
        ratio = statistics.median(t / o for o, t in zip(times["onnxruntime"], times["torch"], strict=True))
        out.append({"stage": stage.name, "architecture": stage.sae.cfg.architecture, "d_in": stage.sae.d_in,
                    "d_sae": stage.sae.d_sae, "residual": stage.is_residual,
                    "vectors_per_s": {n: rows / statistics.median(v) for n, v in times.items()},
                    "onnx_over_torch": ratio})
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process in bytes (Linux /proc)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def _requests(stack_dir: Path, rows: int, batches: int) -> list[pb.EncodeActivationsRequest]:
    runtime = StackRuntime.from_loaded(read_stack(stack_dir))
    out = []
    for i in range(batches):
        index = i % len(runtime.stages)
        h, prev = random_inputs(runtime, index, rows, seed=100 + i)
        request = pb.EncodeActivationsRequest(sequence=i, stage=runtime.stages[index].name, top_k=TOP_K,
                                              include_error=True, activations=_raw(h.numpy()))
        if prev is not None:
            request.previous.CopyFrom(_raw(prev.numpy()))
        out.append(request)
    return out


def _raw(x: np.ndarray) -> t.Matrix:
    return t.Matrix(rows=x.shape[0], cols=x.shape[1], raw=x.astype("<f4").tobytes(), dtype=t.DTYPE_FLOAT32)


def server_run(args: list[str], requests: list[pb.EncodeActivationsRequest], rows: int,
               repeats: int) -> dict[str, Any]:
    """Start `featurewire-serve serve ARGS`, wait until SERVING, stream `requests` `repeats` times (after one
    warm-up stream), and read its memory; the process is stopped with SIGTERM."""
    port = _free_port()
    command = [sys.executable, "-m", "service", "serve", *args, "--host", "127.0.0.1", "--port", str(port),
               "--metrics-port", "0", "--device", "cpu", "--log-level", "WARNING"]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 2**30)]) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"server exited: {process.stderr.read() if process.stderr else ''}")
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                        break
                except grpc.RpcError:
                    time.sleep(0.2)
            ready_s = time.perf_counter() - started
            stub = pb_grpc.FeaturewireStub(ch)
            list(stub.EncodeActivations(iter(requests), timeout=600))
            seconds = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                list(stub.EncodeActivations(iter(requests), timeout=600))
                seconds.append(time.perf_counter() - t0)
        memory = _status(process.pid)
    finally:
        process.terminate()
        process.wait(60)
    return {"ready_seconds": ready_s, "rss_mib": memory["VmRSS"] / 2**20, "peak_rss_mib": memory["VmHWM"] / 2**20,
            "grpc_vectors_per_s": rows * len(requests) / statistics.median(seconds)}


def report(stack_arg: str, model: str | None, rows: int, repeats: int, threads: int, batches: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        if stack_arg == "random":
            stack_dir = random_stack(model or "tiny-random", Path(tmp) / "stack")
        else:
            stack_dir = Path(stack_arg)
        stack_dir = with_graphs(stack_dir, Path(tmp))
        kernels = kernel_times(stack_dir, rows, repeats, threads)
        host_model = model or json.loads((stack_dir / "stack.json").read_text())["host_model"]["name"]
        requests = _requests(stack_dir, rows, batches)
        only = server_run(["--no-model", "--stack", str(stack_dir)], requests, rows, repeats)
        check = ["--no-self-check"] if stack_arg == "random" else []
        full = server_run(["--model", host_model, "--stack", str(stack_dir), *check], requests, rows, repeats)
    totals = {n: len(kernels) / sum(1 / k["vectors_per_s"][n] for k in kernels) for n in ("onnxruntime", "torch")}
    return {
        "benchmark": "onnx_encode", "machine": {**machine_info(), "onnxruntime": ort.__version__, "threads": threads},
        "stack": str(stack_arg), "model": host_model, "rows": rows, "top_k": TOP_K, "repeats": repeats,
        "stages": kernels, "servers": {"activation_only": only, "full": full},
        "comparisons": [
            {"what": "ONNX Runtime / torch encode throughput (vectors/s, every stage in turn)",
             "ratio": totals["onnxruntime"] / totals["torch"], "onnxruntime": totals["onnxruntime"],
             "torch": totals["torch"]},
            {"what": "activation-only / full server resident memory (VmRSS)",
             "ratio": only["rss_mib"] / full["rss_mib"]},
            {"what": "activation-only / full server peak memory (VmHWM)",
             "ratio": only["peak_rss_mib"] / full["peak_rss_mib"]},
            {"what": "activation-only / full server gRPC EncodeActivations throughput",
             "ratio": only["grpc_vectors_per_s"] / full["grpc_vectors_per_s"]},
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", required=True, help="a stack directory, or 'random'")
    parser.add_argument("--model", help="host model of the full server (default: the stack's; tiny-random for random)")
    parser.add_argument("--rows", type=int, default=512, help="vectors per batch")
    parser.add_argument("--batches", type=int, default=8, help="batches per gRPC stream")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch and ONNX Runtime threads")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = report(args.stack, args.model, args.rows, args.repeats, args.threads, args.batches)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    m = result["machine"]
    print(f"{args.stack} ({result['model']}) on {m['cpu']}, {args.threads} threads, batches of {args.rows}")
    for k in result["stages"]:
        v = k["vectors_per_s"]
        print(f"  {k['stage']:<28} {k['architecture']:<9} d_sae {k['d_sae']:>6}  onnxruntime {v['onnxruntime']:>10.0f}"
              f"  torch {v['torch']:>10.0f} vectors/s  ratio {k['onnx_over_torch']:.3f}")
    for name, s in result["servers"].items():
        print(f"  {name:<16} RSS {s['rss_mib']:8.1f} MiB  peak {s['peak_rss_mib']:8.1f} MiB  ready in "
              f"{s['ready_seconds']:.1f}s  gRPC {s['grpc_vectors_per_s']:.0f} vectors/s")
    for row in result["comparisons"]:
        print(f"{row['ratio']:8.3f}  {row['what']}")


if __name__ == "__main__":
    main()
