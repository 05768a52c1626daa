"""nnsight's `generate` on the default model with one SAE feature pinned (peer venv; protocol in worker.py).

Arguments (JSON): model_dir (featurewire's cached HF checkpoint of Gemma 3 270M), layer, sae_dir (a SAELens TopK
SAE: cfg.json + sae_weights.safetensors, read here with safetensors alone: nnsight has no SAE support, so users
write the SAE's math themselves), ids, new_tokens, threads. "generate" takes feature and value as arguments.

The edit is featurewire's error-preserving SET and SAELens's `use_error_term=True` pin: at
`model.model.layers[layer].output` (the residual stream after that block, TransformerLens's hook_resid_post),
x' = x + (value − z_f(x))·W_dec[f], where z(x) = TopK_k(ReLU((x − b_dec)·W_enc + b_enc)), at every position
of the prompt and of each generated token (`tracer.iter[:new_tokens]` over the generation's forward passes).
"generate" returns the greedy new token ids; "generate_plain" runs the same `generate` with no edit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import worker

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_sae(sae_dir: Path) -> tuple[dict[str, torch.Tensor], int]:
    from safetensors.torch import load_file

    cfg = json.loads((sae_dir / "cfg.json").read_text())
    if cfg.get("architecture") != "topk" or cfg.get("rescale_acts_by_decoder_norm"):
        raise ValueError(f"expects a plain SAELens TopK SAE, got {cfg.get('architecture')!r}")
    return load_file(str(sae_dir / "sae_weights.safetensors")), int(cfg["k"])


def build(cfg: dict[str, Any]) -> tuple[dict[str, Callable[..., Any]], dict[str, Any]]:
    from nnsight import TransformersModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(cfg["model_dir"])
    model = TransformersModel(hf, tokenizer=tokenizer, task="text-generation")
    weights, k = load_sae(Path(cfg["sae_dir"]))
    w_enc, b_enc, w_dec, b_dec = (weights[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec"))  # (d,H) (H,) (H,d) (d,)
    layer, new_tokens = int(cfg["layer"]), int(cfg["new_tokens"])
    ids = torch.tensor([cfg["ids"]], dtype=torch.long)  # (1, T)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def code_of(x: torch.Tensor, feature: int) -> torch.Tensor:  # (1, T, d) -> (1, T): z_f, 0 unless in the top k
        pre = torch.relu((x - b_dec) @ w_enc + b_enc)  # (1, T, H)
        top = pre.topk(k, dim=-1)
        hit = top.indices == feature  # (1, T, k)
        return (top.values * hit).sum(-1)

    def generate(feature: int = 0, value: float = 0.0, steered: bool = True) -> list[int]:
        with torch.no_grad():
            if not steered:
                out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
                return out[0, ids.shape[1]:].tolist()
            with model.generate(inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False) as tracer:
                for _ in tracer.iter[:new_tokens]:  # one forward per new token: the prefill, then each decode step
                    h = model.model.layers[layer].output  # (1, T or 1, d)
                    h[:] = h + (value - code_of(h, feature)).unsqueeze(-1) * w_dec[feature]
                result = tracer.result.save()
        return result[0, ids.shape[1]:].tolist()  # (new_tokens,)

    info = {"versions": worker.versions("nnsight", "transformers"), "torch_threads": torch.get_num_threads(),
            "nnsight_api": "TransformersModel + generate + tracer.iter", "sae_k": k}
    return {"generate": generate, "generate_plain": lambda: generate(steered=False)}, info


if __name__ == "__main__":
    worker.run(build)
