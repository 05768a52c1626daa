"""featurewire against its peers (eai-sparsify, SAELens/TransformerLens, nnsight): ratios measured in one run.

    make bench-peers                                   # creates .venv-peers (the peers, torch pinned), then runs this
    .venv/bin/python bench/peers.py [--items train,decompose,generate] [--repeats 3] [--json]

Peers are opponents, never dependencies: they live in .venv-peers and run there as worker processes
(bench/peers/*.py, a JSON-lines protocol in bench/peers/worker.py) that build their workload once and time it on
request; featurewire runs in this process (training) or as a real `serve` process on a loopback port (gRPC).
Each repeat times every variant once, the order reversed on every other repeat, so drift on a shared machine
hits all alike; ratios are medians of per-repeat ratios (peer time / featurewire time: > 1 means featurewire
is faster). Items, each skipped with the reason when its peer cannot be installed or run:

- train: one TopK training step, sparsify's SparseCoder (bench/peers/sparsify_step.py) against
  `trainer.training.optimization.train_step`, N(0, 1) inputs, fp32, same thread count; at d_in 640, width 4096,
  k 32, batch 1024, and at the demo stack's shapes (width 2048, batch 512; the demo trains SA-GSAE, timed too).
- decompose: a random SAELens TopK SAE at blocks.6.hook_resid_post of the default model, saved with SAELens,
  imported with `featurewire-train import`; gRPC Decompose (top-32 codes and error norms of every token) against
  `run_with_cache_with_saes` with and without `stop_at_layer`; checks that Decompose gives SAELens's codes and
  that `featurewire-train export --to saelens` of the imported stage loads in SAELens with the same codes. A
  control times the plain HF body in the SAELens process, to tell TransformerLens's own cost from machine load.
- generate: greedy generation with one feature pinned (SET, every position): gRPC Generate against
  TransformerLens `generate` with the SAE attached with `use_error_term=True` and against nnsight `generate`
  with the same edit; tokens/s ratios and whether the three give the same tokens. With more than one thread,
  the same at 1 thread too (a second server run with `--threads 1`, a second nnsight process) and plain HF
  `generate` at both counts: the 1 -> default-thread speed-ups of featurewire's server, nnsight and HF, and
  featurewire's over HF's (target 0.9). The thread counts the server logged are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from machine import machine_info
from peer_process import Peer, interleave, ratio, skipped, timed

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
LAYER = 6
HOOK = f"blocks.{LAYER}.hook_resid_post"
TOP_K = 32


def train_item(args: argparse.Namespace, log_dir: Path) -> list[dict[str, Any]]:
    """sparsify's TopK step against ours at two shapes; the demo shape also times our SA-GSAE step."""
    from train_throughput import make_step

    from core.sae import SAEConfig, build_sae
    from trainer.training.optimization import make_optimizer, train_step

    rows = []
    for label, width, batch, extra in (("d_in 640, width 4096, k 32, batch 1024", 4096, 1024, False),
                                       ("demo shapes: d_in 640, width 2048, k 32, batch 512", 2048, 512, True)):
        cfg = {"d_in": 640, "width": width, "k": 32, "batch": batch, "threads": torch.get_num_threads(), "seed": 0}
        peer = Peer(args.peer_python, "sparsify_step.py", cfg, log_dir)
        if not peer.ready:
            rows.append(skipped("train", f"eai-sparsify: {peer.error}"))
            continue
        gen = torch.Generator().manual_seed(0)
        batches = [torch.randn(batch, 640, generator=gen) for _ in range(4)]  # (batch, d_in), E‖x‖² = d_in
        sae = build_sae(SAEConfig("topk", 640, width, k=32))
        sae.init_b_dec_(batches[0])
        optimizer, dead, state = make_optimizer(sae, lr=1e-4), torch.zeros(width, dtype=torch.bool), {"i": 0}

        def ours(sae: Any = sae, optimizer: Any = optimizer, dead: Any = dead, state: Any = state,
                 batches: Any = batches) -> None:
            state["i"] += 1
            train_step(sae, optimizer, batches[state["i"] % 4], dead_mask=dead)

        variants: dict[str, Callable[[], float]] = {
            "featurewire_topk": lambda ours=ours: timed(ours, args.steps),
            "sparsify_topk": lambda peer=peer: peer.time("step", args.steps)}
        if extra:
            sa_gsae = make_step("sa_gsae", 640, width, batches)
            variants["featurewire_sa_gsae"] = lambda step=sa_gsae: timed(step, args.steps)
        try:
            for fn in variants.values():  # warm-up: allocator, Adam state, thread pools
                fn()
            seconds = interleave(variants, args.repeats)
            fvu = peer.call("fvu")
        finally:
            peer.close()
        row = {"item": "train", "shape": label, "peer": peer.info, "steps": args.steps,
               "median_s_per_step": {k: statistics.median(v) for k, v in seconds.items()}, "raw": seconds,
               "sparsify_fvu_after": fvu,
               "ratios": [{"what": "TopK step: sparsify s/step / featurewire s/step", "ratio":
                           ratio(seconds, "sparsify_topk", "featurewire_topk"), "target": 1.2}]}
        if extra:
            row["ratios"].append({"what": "sparsify TopK step / featurewire SA-GSAE step (the demo's architecture; "
                                  "information, not a like-for-like pair)",
                                  "ratio": ratio(seconds, "sparsify_topk", "featurewire_sa_gsae"), "target": None})
        rows.append(row)
    return rows


def prompt(model_dir: Path, tokens: int) -> list[int]:
    """`tokens` ids of `pydoc_data.topics` prose, BOS first (as bench/hook_overhead.py's prompt)."""
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = "".join(topics[key] for key in sorted(topics))[: 8 * tokens]
    return list(tokenizer(text).input_ids[:tokens])


def featurewire_cli(*argv: str) -> str:
    done = subprocess.run([sys.executable, "-m", "trainer", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    if done.returncode:
        raise RuntimeError(f"featurewire-train {argv[0]} failed: {done.stderr.strip()[-600:]}")
    return done.stdout.strip()


def compare_codes(ours: list[dict[str, list[float]]], theirs: list[dict[str, list[float]]]) -> dict[str, Any]:
    """Per token, the same active features (value ≠ 0) and their largest value difference, relative to max |z|."""
    same, worst, scale = 0, 0.0, 1e-12
    for a, b in zip(ours, theirs, strict=True):
        da = {int(i): v for i, v in zip(a["ids"], a["values"], strict=True) if v != 0}
        db = {int(i): v for i, v in zip(b["ids"], b["values"], strict=True) if v != 0}
        same += set(da) == set(db)
        scale = max(scale, *map(abs, da.values()), *map(abs, db.values()))
        worst = max([worst, *(abs(da[i] - db[i]) for i in set(da) & set(db))])
    return {"tokens": len(ours), "same_active_features": same, "max_abs_diff_over_max_code": worst / scale}


def serve_items(args: argparse.Namespace, log_dir: Path, work: Path, items: set[str]) -> list[dict[str, Any]]:
    """decompose and generate: one SAELens SAE, imported into a stack that a real featurewire server serves."""
    import grpc
    from featurewire.v1 import featurewire_pb2 as pb
    from featurewire.v1 import featurewire_pb2_grpc as pb_grpc
    from featurewire.v1 import types_pb2 as t
    from http_gateway import ServerProcess

    from core.config import default_cache_dir
    from core.host.gguf_cache import default_model_dir

    if not args.peer_python.exists():  # before loading anything: the default model may still need converting
        return [skipped(item, f"no peer environment at {args.peer_python}: run `make bench-peers`")
                for item in sorted(items)]
    model_dir = default_model_dir(default_cache_dir(os.environ))
    ids = prompt(model_dir, args.tokens)
    cfg = {"model_dir": str(model_dir), "layer": LAYER, "sae_dir": str(work / "saelens_sae"), "width": args.width,
           "k": 32, "seed": 0, "ids": ids, "new_tokens": args.new_tokens, "top_k": TOP_K,
           "threads": torch.get_num_threads()}
    saelens = Peer(args.peer_python, "saelens_model.py", cfg, log_dir)
    if not saelens.ready:
        return [skipped(item, f"SAELens/TransformerLens: {saelens.error}") for item in sorted(items)]
    rows: list[dict[str, Any]] = []
    server = None
    try:
        featurewire_cli("import", "--from", "saelens", cfg["sae_dir"], "--model", "default", "--hookpoint", HOOK,
                        "--out", str(work / "stack"))
        featurewire_cli("export", "--to", "saelens", "--stack", str(work / "stack"), "--out", str(work / "exported"))
        export_check = saelens.call("check_export", path=str(work / "exported"))
        if args.threads:  # the server is a process of its own: torch reads its thread count from the environment
            os.environ["OMP_NUM_THREADS"] = str(args.threads)
        server = ServerProcess("default", work / "stack")
        stub = pb_grpc.FeaturewireStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
        (stack,) = stub.ListStacks(pb.ListStacksRequest(), timeout=60).stacks[:1]
        tokens = t.Input(token_ids=t.TokenIds(ids=ids))
        request = pb.DecomposeRequest(stack=stack.name, input=tokens, chunk_tokens=32,
                                      options=t.DecomposeOptions(top_k=TOP_K, include_error=True))

        def decompose() -> list[dict[str, list[float]]]:
            return [{"ids": list(f.features[0].ids), "values": list(f.features[0].values)}
                    for r in stub.Decompose(request, timeout=600) if r.HasField("chunk") for f in r.chunk.tokens]

        codes = decompose()
        check = compare_codes(codes, saelens.call("codes"))
        if "decompose" in items:
            variants = {"featurewire_grpc_decompose": lambda: timed(decompose),
                        "saelens_run_with_cache": lambda: saelens.time("cache"),
                        "saelens_run_with_cache_stop_at_layer": lambda: saelens.time("cache_stop"),
                        "control_hf_body_in_peer_process": lambda: saelens.time("hf_body")}
            for fn in variants.values():
                fn()
            seconds = interleave(variants, args.repeats)
            peers = ["saelens_run_with_cache", "saelens_run_with_cache_stop_at_layer"]
            rows.append({"item": "decompose", "peer": saelens.info, "tokens": len(ids), "raw": seconds,
                         "median_s": {k: statistics.median(v) for k, v in seconds.items()},
                         "codes_vs_saelens": check, "export_check": export_check, "ratios": [
                             {"what": "SAELens run_with_cache_with_saes (faster of with/without stop_at_layer) / "
                                      "featurewire gRPC Decompose", "ratio": ratio(seconds, peers,
                                                                                   "featurewire_grpc_decompose"),
                              "target": 1.1},
                             *({"what": f"{p} / featurewire gRPC Decompose", "target": None,
                                "ratio": ratio(seconds, p, "featurewire_grpc_decompose")}
                               for p in [*peers, "control_hf_body_in_peer_process"])]})
        if "generate" in items:
            rows.append(generate_item(args, saelens, cfg, stub, stack, codes, log_dir, server, work))
    except Exception as exc:  # a peer or the import/export failing must not stop the other items
        rows.append(skipped("decompose/generate", f"{type(exc).__name__}: {exc}"))
    finally:
        saelens.close()
        if server is not None:
            server.stop()
    return rows


def steering_target(codes: list[dict[str, list[float]]]) -> tuple[int, float]:
    """The feature active on most prompt tokens, pinned to twice its largest value there."""
    counts: dict[int, list[float]] = {}
    for token in codes:
        for i, v in zip(token["ids"], token["values"], strict=True):
            if v > 0:
                counts.setdefault(int(i), []).append(v)
    feature = max(counts, key=lambda i: (len(counts[i]), sum(counts[i])))
    return feature, float(2 * max(counts[feature]))


def generate_item(args: argparse.Namespace, saelens: Peer, cfg: dict[str, Any], stub: Any, stack: Any,
                  codes: list[dict[str, list[float]]], log_dir: Path, server: Any, work: Path) -> dict[str, Any]:
    """Steered greedy generation: gRPC Generate vs TransformerLens (use_error_term=True) and nnsight, at the default
    thread count; with more than one thread, also everything at 1 thread (a second server started with
    `--threads 1`, a second nnsight process) and plain HF `generate`, for the 1 -> default scaling lines."""
    import grpc
    from featurewire.v1 import featurewire_pb2 as pb
    from featurewire.v1 import featurewire_pb2_grpc as pb_grpc
    from featurewire.v1 import types_pb2 as t
    from http_gateway import ServerProcess

    feature, value = steering_target(codes)
    sampling = pb.SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)  # temperature 0 = greedy
    prompt_input = t.Input(token_ids=t.TokenIds(ids=cfg["ids"]))
    steered = pb.GenerateRequest(stack=stack.name, prompt=prompt_input, sampling=sampling, interventions=[
        t.Intervention(stage=stack.stages[0].name, feature=feature, op=t.INTERVENTION_OP_SET, value=value)])
    plain = pb.GenerateRequest(stack=stack.name, prompt=prompt_input, sampling=sampling)

    def generate(request: Any = steered, stub: Any = stub) -> list[int]:
        return [r.token.token_id for r in stub.Generate(request, timeout=1800) if r.HasField("token")]

    ours = generate()
    tokens = {"featurewire": ours, "featurewire_unsteered": generate(plain),
              "transformer_lens": saelens.call("generate", feature=feature, value=value)}
    threads = torch.get_num_threads()
    variants: dict[str, Callable[[], float]] = {
        "featurewire_grpc_generate": lambda: timed(generate),
        "transformer_lens_generate": lambda: saelens.time("generate", feature=feature, value=value)}
    peer_cfg = {k: cfg[k] for k in ("model_dir", "layer", "sae_dir", "ids", "new_tokens", "threads")}
    nnsight = Peer(args.peer_python, "nnsight_generate.py", peer_cfg, log_dir)
    nnsight_1 = server_1 = None
    thread_counts = {"featurewire_server": server.threads, "here_and_peers": threads}
    notes = []
    if nnsight.ready:
        tokens["nnsight"] = nnsight.call("generate", feature=feature, value=value)
        variants["nnsight_generate"] = lambda: nnsight.time("generate", feature=feature, value=value)
        variants["hf_generate"] = lambda: nnsight.time("generate_plain")
        nnsight.call("generate_plain")
    else:
        notes.append(skipped("generate", f"nnsight: {nnsight.error}")["skipped"])
    try:
        if threads > 1:
            server_1 = ServerProcess("default", work / "stack", extra=("--threads", "1"))
            thread_counts["featurewire_server_1_thread"] = server_1.threads
            stub_1 = pb_grpc.FeaturewireStub(grpc.insecure_channel(f"127.0.0.1:{server_1.grpc_port}"))
            generate(stub=stub_1)
            variants["featurewire_grpc_generate_1_thread"] = lambda: timed(lambda: generate(stub=stub_1))
            nnsight_1 = Peer(args.peer_python, "nnsight_generate.py", {**peer_cfg, "threads": 1}, log_dir)
            if nnsight_1.ready:
                nnsight_1.call("generate", feature=feature, value=value)
                nnsight_1.call("generate_plain")
                variants["nnsight_generate_1_thread"] = lambda: nnsight_1.time("generate", feature=feature,
                                                                               value=value)
                variants["hf_generate_1_thread"] = lambda: nnsight_1.time("generate_plain")
        seconds = interleave(variants, args.repeats)  # the calls above were the warm-up
    finally:
        nnsight.close()
        if nnsight_1 is not None:
            nnsight_1.close()
        if server_1 is not None:
            server_1.stop()
    first_difference = {name: next((i for i, (a, b) in enumerate(zip(ours, other, strict=False)) if a != b), None)
                        for name, other in tokens.items() if name != "featurewire"}
    ratios = [{"what": f"{p} / featurewire gRPC Generate (steered, greedy, {args.new_tokens} new tokens, "
                       f"{threads} threads; = tokens/s ratio)", "ratio": ratio(seconds, p, "featurewire_grpc_generate"),
               "target": 1.1 if p == "nnsight_generate" else None}
              for p in ("nnsight_generate", "transformer_lens_generate") if p in seconds]
    ratios += scaling_ratios(seconds, threads)
    return {"item": "generate", "feature": feature, "value": value, "new_tokens": args.new_tokens,
            "threads": thread_counts, "peer": {"saelens": saelens.info, "nnsight": nnsight.info}, "notes": notes,
            "tokens": tokens, "first_difference_from_featurewire": first_difference, "raw": seconds,
            "median_s": {k: statistics.median(v) for k, v in seconds.items()},
            "tokens_per_s": {k: args.new_tokens / statistics.median(v) for k, v in seconds.items()},
            "ratios": ratios}


def scaling_ratios(seconds: dict[str, list[float]], threads: int) -> list[dict[str, Any]]:
    """1 -> `threads` speed-ups (median over repeats of t(1 thread) / t(threads)) of featurewire's server and of HF
    `generate`, and the first over the second (target 0.9: the server must use the cores as well as HF does)."""
    rows: list[dict[str, Any]] = []
    speedups = {}
    for name, label in (("featurewire_grpc_generate", "featurewire gRPC Generate (steered)"),
                        ("nnsight_generate", "nnsight generate (steered)"), ("hf_generate", "HF generate (plain)")):
        if f"{name}_1_thread" in seconds:
            speedups[name] = ratio(seconds, f"{name}_1_thread", name)
            rows.append({"what": f"{label}: 1 -> {threads} threads speed-up", "ratio": speedups[name],
                         "target": None})
    if {"featurewire_grpc_generate", "hf_generate"} <= speedups.keys():
        rows.append({"what": f"featurewire's 1 -> {threads} threads speed-up / HF generate's",
                     "ratio": speedups["featurewire_grpc_generate"] / speedups["hf_generate"], "target": 0.9})
    return rows


def print_report(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"machine: {m['platform']}, {m['cpu']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), "
          f"torch {m['torch']}, python {m['python']}; load average {result['load_before']} before, "
          f"{result['load_after']} after; {result['repeats']} interleaved repeats, medians")
    for row in result["rows"]:
        if "skipped" in row:
            print(f"\n[{row['item']}] skipped: {row['skipped']}")
            continue
        versions = row["peer"].get("versions") or {k: v.get("versions") for k, v in row["peer"].items()}
        print(f"\n[{row['item']}] {row.get('shape', '')} peers: {json.dumps(versions)}")
        for name, s in (row.get("median_s") or row.get("median_s_per_step") or {}).items():
            print(f"  {name:<40} {s:9.4f} s")
        for r in row["ratios"]:
            target = f"target >= {r['target']}" if r["target"] else "(no target)"
            print(f"  {r['ratio']:7.3f}  {target:<15} {r['what']}")
        if "codes_vs_saelens" in row:
            c, e = row["codes_vs_saelens"], row["export_check"]
            print(f"  Decompose vs SAELens codes: {c['same_active_features']}/{c['tokens']} tokens with the same "
                  f"active features, max |Δz| / max |z| = {c['max_abs_diff_over_max_code']:.2e}")
            print(f"  export --to saelens, loaded with SAE.load_from_disk ({e['architecture']}): same active "
                  f"features {e['same_active_features']}, max |Δz| {e['max_abs_code_diff']:.3g} "
                  f"(max |z| {e['max_abs_code']:.4g})")
        if row["item"] == "generate":
            print("  torch threads: " + ", ".join(f"{k} {v}" for k, v in row["threads"].items()))
            print(f"  feature {row['feature']} pinned to {row['value']:.4g}; tokens/s: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in row["tokens_per_s"].items()))
            for name, where in row["first_difference_from_featurewire"].items():
                same = "same greedy tokens" if where is None else f"first differs at new token {where}"
                print(f"  featurewire vs {name}: {same}")
            for note in row["notes"]:
                print(f"  note: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", default="train,decompose,generate", help="comma-separated subset")
    parser.add_argument("--peer-python", type=Path, default=PEER_PYTHON, help="python of the peer venv")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    parser.add_argument("--steps", type=int, default=5, help="training steps per timing (default 5)")
    parser.add_argument("--tokens", type=int, default=128, help="prompt tokens for Decompose and generation")
    parser.add_argument("--new-tokens", type=int, default=32, help="generated tokens (default 32)")
    parser.add_argument("--width", type=int, default=4096, help="d_sae of the served SAE (default 4096)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads here, in the peers and in the server (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    items = {i.strip() for i in args.items.split(",") if i.strip()}
    if unknown := items - {"train", "decompose", "generate"}:
        parser.error(f"unknown items: {', '.join(sorted(unknown))}")
    load_before = [round(x, 2) for x in os.getloadavg()]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="featurewire-peers-") as tmp:
        work = Path(tmp)
        if "train" in items:
            rows += train_item(args, work)
        if items & {"decompose", "generate"}:
            rows += serve_items(args, work, work, items & {"decompose", "generate"})
    result = {"benchmark": "peers", "machine": machine_info(), "repeats": args.repeats,
              "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()], "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
