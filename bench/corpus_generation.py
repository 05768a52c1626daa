"""Generated-corpus sampling speed per batch size, and against HF `generate` on the same prompts in the same run.

    python bench/corpus_generation.py [--model default] [--batch-sizes 8,16,32,64] [--new-tokens 48] [--json]

"ours" is the trainer's sampling loop (trainer/data/sampling.py: KV cache, logits of the last position only,
exact top-p found among the 1,024 most likely tokens). "hf" is `model.generate(do_sample=True, top_p, top_k=0)`
on the same left-padded batch (its top-p sorts the whole 262k vocabulary each step). Both sample
--new-tokens tokens per row from BOS + a shipped opening, EOS ignored for the timing (min_new_tokens), at
temperature 1, top-p 0.95. Reports sampled tokens/s per batch size (ours) and the ratio ours / hf at the
largest batch size (`--hf-batch`, default: the largest listed). Tokens/s here is the figure that sizes a
generated corpus: 150,000 tokens take 150,000 / (tokens/s) seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch
from machine import machine_info
from transformers import GenerationConfig

from core.config import add_model_arguments, model_config_from_args
from core.host.devices import dtype_name
from core.host.loading import load_host_model
from trainer.data.generated import _left_padded
from trainer.data.generation_settings import load_openings
from trainer.data.sampling import sample_batch


def _batch(host, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    texts = load_openings().texts
    bos = [host.tokenizer.bos_token_id] if host.tokenizer.bos_token_id is not None else []
    rows = [bos + host.tokenizer(texts[(7 * i) % len(texts)], add_special_tokens=False).input_ids
            for i in range(size)]
    pad = host.tokenizer.pad_token_id if host.tokenizer.pad_token_id is not None else 0
    return _left_padded(rows, pad)


def time_ours(host, size: int, new_tokens: int) -> float:
    ids, mask = _batch(host, size)
    pad = host.tokenizer.pad_token_id or 0
    started = time.perf_counter()
    out = sample_batch(host.model, ids, mask, max_new_tokens=new_tokens, temperature=1.0, top_p=0.95,
                       eos_ids=set(), pad_id=pad, seed=0)  # no EOS: every row runs new_tokens steps
    seconds = time.perf_counter() - started
    assert out.shape == (size, new_tokens)
    return size * new_tokens / seconds


def time_hf(host, size: int, new_tokens: int) -> float:
    ids, mask = _batch(host, size)
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, temperature=1.0,
                              top_p=0.95, top_k=0, pad_token_id=host.tokenizer.pad_token_id,
                              eos_token_id=host.tokenizer.eos_token_id)
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.inference_mode():
        out = host.model.generate(ids, attention_mask=mask, generation_config=config)
    seconds = time.perf_counter() - started
    return size * (out.shape[1] - ids.shape[1]) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser, default_model="default")
    parser.add_argument("--batch-sizes", default="8,16,32,64")
    parser.add_argument("--new-tokens", type=int, default=48, help="sampled tokens per row")
    parser.add_argument("--hf-batch", type=int, default=0, help="batch size of the HF comparison (0: the largest)")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF generate comparison")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    config = model_config_from_args(args, os.environ)
    host = load_host_model(config)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    time_ours(host, 2, 4)  # warm-up: first-call allocations and kernel choices
    rows: dict[str, Any] = {}
    for size in sizes:
        rows[str(size)] = round(time_ours(host, size, args.new_tokens), 1)
        print(f"batch {size:>3}: {rows[str(size)]:>7.1f} tokens/s", flush=True)
    report: dict[str, Any] = {"tokens_per_second": rows, "new_tokens": args.new_tokens}
    if not args.no_hf:
        size = args.hf_batch or max(sizes)
        ours, hf = time_ours(host, size, args.new_tokens), time_hf(host, size, args.new_tokens)
        report["hf_comparison"] = {"batch": size, "ours": round(ours, 1), "hf_generate": round(hf, 1),
                                   "ratio": round(ours / hf, 2)}
        print(f"batch {size}: ours {ours:.1f} tokens/s, HF generate {hf:.1f} tokens/s, ratio {ours / hf:.2f}x")
    report["machine"] = {**machine_info(), "model": host.name, "dtype": dtype_name(host.dtype),
                         "threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
