"""The steerability measure's speed: generated tokens/s against a plain batched HF `generate`, and features/minute.

    python bench/steerability.py --stack runs/demo/stack [--stage NAME] [--features 1,2,3,4] [--batch-rows 64]
                                 [--tokens 16] [--repeats 3] [--fpm-features 1] [--threads 1] [--json]

"generation": `generate_rows` (trainer/steerability/generation.py: left-padded rows, one batched KV cache, a write
hook that edits each row with its own feature and ADD/SET amount) on --batch-rows greedy rows, every row steered
(features x strengths x openings), against HF `model.generate` (greedy, min_new_tokens = max_new_tokens, no hook)
on the same left-padded prompts and batch size, alternating which runs first; the median of the per-round ratios.
"evaluation": `measure_features` on the listed features with settings that make whole batches (generation,
unedited re-read, output score) as generated tokens/s against the same HF figure. "features/min": the default
settings of `featurewire-train steerability` on --fpm-features features (0 skips it), wall time per feature.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch
from machine import machine_info

from core.config import ModelConfig, add_model_arguments, model_config_from_args
from core.host.devices import dtype_name
from core.host.loading import load_host_model
from core.stack.reader import read_stack
from core.stack.runtime import StackRuntime
from trainer.steerability.build import read_openings, resolve_stages, targets_for
from trainer.steerability.generation import Row, RowEdit, generate_rows, left_pad
from trainer.steerability.measure import SteerSettings, measure_features, residual_norm
from trainer.steerability.schedule import DEFAULT_STRENGTHS, parse_strengths


def _rows(host, runtime, stage_index, targets, openings, size: int, norm: float) -> list[Row]:
    """`size` greedy rows cycling through features x (ADD 4x max, SET 4x max) x openings."""
    from trainer.steerability.measure import edit_amount
    from trainer.steerability.schedule import Strength

    rows = []
    strengths = [Strength("add", "max", 4.0), Strength("set", "max", 4.0)]
    while len(rows) < size:
        for target in targets:
            for strength in strengths:
                amount = edit_amount(runtime, stage_index, target, strength, norm)
                for opening in openings:
                    rows.append(Row(tuple(opening), RowEdit(target.index, strength.op, amount), None))
    return rows[:size]


def time_ours(host, runtime, stage_index, rows, tokens: int) -> float:
    started = time.perf_counter()
    out = generate_rows(host, runtime, runtime.stages[stage_index], rows, tokens, 1.0)
    assert out.tokens.shape == (len(rows), tokens)
    return len(rows) * tokens / (time.perf_counter() - started)


def time_hf(host, rows, tokens: int) -> float:
    pad = host.tokenizer.pad_token_id if host.tokenizer.pad_token_id is not None else 0
    ids, mask = left_pad([row.prompt for row in rows], pad)
    started = time.perf_counter()
    with torch.inference_mode():
        out = host.model.generate(ids.to(host.device), attention_mask=mask.to(host.device), max_new_tokens=tokens,
                                  min_new_tokens=tokens, do_sample=False, pad_token_id=pad)
    return len(rows) * (out.shape[1] - ids.shape[1]) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stack", default="runs/demo/stack")
    parser.add_argument("--stage", help="stage name or index (default: the last)")
    parser.add_argument("--features", default="1,2,3,4", help="feature ids that fired in the dashboard pass")
    parser.add_argument("--batch-rows", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fpm-features", type=int, default=1, help="features timed at the default settings")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--json", action="store_true")
    add_model_arguments(parser, default_model="the one the stack names")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    stack = read_stack(args.stack)
    host = load_host_model(model_config_from_args(args, os.environ, defaults=ModelConfig(name=stack.identity.name)))
    stack = read_stack(args.stack, device=host.device)
    runtime = StackRuntime.from_loaded(stack)
    stage_index = resolve_stages(stack, args.stage)[0] if args.stage else len(stack.stages) - 1
    stage = stack.stages[stage_index]
    features = [int(f) for f in args.features.split(",")]
    targets = targets_for(stage, features)
    openings = [tuple(host.tokenizer(text).input_ids) for text in read_openings()]
    norm = residual_norm(host, stage.hookpoint, openings)
    rows = _rows(host, runtime, stage_index, targets, openings[:8], args.batch_rows, norm)
    time_ours(host, runtime, stage_index, rows[:2], 2)  # warm-up
    ours, hf, ratios = [], [], []
    for repeat in range(args.repeats):
        first, second = (time_ours, time_hf) if repeat % 2 == 0 else (time_hf, time_ours)
        a = first(host, runtime, stage_index, rows, args.tokens) if first is time_ours else first(host, rows,
                                                                                                  args.tokens)
        b = second(host, runtime, stage_index, rows, args.tokens) if second is time_ours else second(host, rows,
                                                                                                     args.tokens)
        o, h = (a, b) if first is time_ours else (b, a)
        ours.append(o)
        hf.append(h)
        ratios.append(o / h)
        print(f"round {repeat}: ours {o:.1f} tokens/s, HF generate {h:.1f} tokens/s, ratio {o / h:.3f}", flush=True)
    report: dict[str, Any] = {"stage": stage.name, "batch_rows": args.batch_rows, "tokens": args.tokens,
                              "generation": {"ours": statistics.median(ours), "hf_generate": statistics.median(hf),
                                             "ratio": statistics.median(ratios)}}
    # the whole evaluation: openings x strengths x features rows = whole batches of --batch-rows
    strengths = tuple(parse_strengths(["add:max:2,4", "set:max:4", "add:norm:1"]))
    n_openings = max(1, args.batch_rows // (len(strengths) * len(targets)))
    settings = SteerSettings(strengths, max_new_tokens=args.tokens, samples=0, batch_rows=args.batch_rows)
    started = time.perf_counter()
    measure_features(host, runtime, stage_index, targets, openings[:n_openings], settings, norm)
    seconds = time.perf_counter() - started
    generated = (len(targets) * len(strengths) + 1) * n_openings * args.tokens
    report["evaluation"] = {"features": len(targets), "openings": n_openings, "seconds": seconds,
                            "generated_tokens_per_second": generated / seconds,
                            "ratio_to_hf_generate": generated / seconds / statistics.median(hf)}
    print(f"evaluation: {len(targets)} features x {len(strengths)} strengths x {n_openings} openings in {seconds:.1f} s"
          f", {generated / seconds:.1f} generated tokens/s, {report['evaluation']['ratio_to_hf_generate']:.3f}x HF "
          "generate", flush=True)
    if args.fpm_features:
        defaults = SteerSettings(tuple(parse_strengths(list(DEFAULT_STRENGTHS))), batch_rows=args.batch_rows)
        started = time.perf_counter()
        measure_features(host, runtime, stage_index, targets[:args.fpm_features], openings, defaults, norm)
        seconds = time.perf_counter() - started
        report["default_settings"] = {"features": args.fpm_features, "seconds": seconds,
                                      "features_per_minute": 60 * args.fpm_features / seconds}
        print(f"default settings: {args.fpm_features} features in {seconds:.1f} s, "
              f"{60 * args.fpm_features / seconds:.2f} features/min", flush=True)
    report["machine"] = {**machine_info(), "model": host.name, "dtype": dtype_name(host.dtype),
                         "threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
