"""SAELens `HookedSAETransformer` on the default model with one TopK SAE (peer venv; protocol in worker.py).

Arguments (JSON): model_dir (featurewire's cached HF checkpoint of Gemma 3 270M: safetensors + tokenizer.json),
layer, sae_dir, width, k, seed, ids (the prompt's token ids), new_tokens, top_k, threads.

TransformerLens never touches the hub here: the HF model and tokenizer are loaded from model_dir and handed to
`HookedSAETransformer.from_pretrained_no_processing("google/gemma-3-270m", hf_model=..., tokenizer=...)` (TL knows
this model's architecture from its own table). When sae_dir holds no SAE yet, a random TopK SAE at
blocks.{layer}.hook_resid_post is made (decoder rows unit norm, b_dec the prompt's mean activation) and saved
with `save_model`; either way it is then loaded back with `SAE.load_from_disk`, the path users take.

Calls:
- cache / cache_stop: `run_with_cache_with_saes(ids, saes=[sae], names_filter=<the SAE's input, codes and
  reconstruction>)`, without and with `stop_at_layer=layer + 1`, then top-k codes and the error norm per token
  (what a Decompose response carries), on the CPU.
- generate / generate_plain: greedy `model.generate` of new_tokens tokens from ids with the SAE attached through
  `add_sae(sae, use_error_term=True)` and feature `feature` pinned to `value` (call arguments) at every position
  by a hook on hook_sae_acts_post; generate_plain without SAE or hook. Both return the generated token ids.
- codes: per token, the top-k (ids, values) of the SAE's codes on the prompt.
- hf_body: the plain HF body forward (18 layers, no logits) of the prompt in this process: a control that shows
  how fast this process runs plain torch work next to TransformerLens's.
- check_export(path): load a SAELens SAE from `path` (what `featurewire-train export --to saelens` wrote) and
  compare its codes with the original SAE's on the prompt's activations.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import worker

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail fast instead of reaching for the hub
TL_NAME = "google/gemma-3-270m"


def load_model(model_dir: str) -> tuple[Any, Any]:
    """(TransformerLens model, the HF model it was built from: kept as a control for this process's speed)."""
    from sae_lens import HookedSAETransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = HookedSAETransformer.from_pretrained_no_processing(TL_NAME, hf_model=hf, tokenizer=tokenizer,
                                                               device="cpu", dtype=torch.float32)
    gc.collect()
    return model.eval(), hf


def make_sae(model: Any, hook: str, cfg: dict[str, Any], ids: torch.Tensor, sae_dir: Path) -> None:
    """A random TopK SAE in SAELens's own format, decoder rows unit norm (so its codes need no rescaling)."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(int(cfg.get("seed", 0)))
    sae = TopKSAE(TopKSAEConfig(d_in=model.cfg.d_model, d_sae=int(cfg["width"]), k=int(cfg["k"]), dtype="float32",
                                device="cpu", metadata=SAEMetadata(hook_name=hook, model_name=TL_NAME)))
    with torch.no_grad():
        sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))  # (d_sae, d_in), unit rows
        _, cache = model.run_with_cache(ids, names_filter=hook, stop_at_layer=int(cfg["layer"]) + 1)
        sae.b_dec.copy_(cache[hook][0].mean(0))  # (d_in,)
    sae.save_model(sae_dir)


def build(cfg: dict[str, Any]) -> tuple[dict[str, Callable[..., Any]], dict[str, Any]]:
    from sae_lens import SAE

    layer, top_k = int(cfg["layer"]), int(cfg.get("top_k", 32))
    hook = f"blocks.{layer}.hook_resid_post"
    acts, sae_in, recons = (f"{hook}.hook_sae_acts_post", f"{hook}.hook_sae_input", f"{hook}.hook_sae_recons")
    ids = torch.tensor([cfg["ids"]], dtype=torch.long)  # (1, T)
    model, hf = load_model(cfg["model_dir"])
    sae_dir = Path(cfg["sae_dir"])
    if not (sae_dir / "cfg.json").exists():
        make_sae(model, hook, cfg, ids, sae_dir)
    sae = SAE.load_from_disk(str(sae_dir), device="cpu")
    new_tokens = int(cfg["new_tokens"])

    def decompose(stop: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        extra = {"stop_at_layer": layer + 1} if stop else {}
        with torch.no_grad():
            _, cache = model.run_with_cache_with_saes(ids, saes=[sae], names_filter=[acts, sae_in, recons], **extra)
            top = cache[acts][0].topk(top_k, dim=-1)  # (T, top_k)
            error = (cache[sae_in][0] - cache[recons][0]).norm(dim=-1)  # (T,)
        return top.indices.cpu(), top.values.cpu(), error.cpu()

    def generate(feature: int = 0, value: float = 0.0, steered: bool = True) -> list[int]:
        def pin(codes: torch.Tensor, hook: Any) -> torch.Tensor:  # (1, T, d_sae): SET feature at every position
            codes[..., feature] = value
            return codes

        with torch.no_grad():
            if not steered:
                out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, stop_at_eos=False,
                                     verbose=False, prepend_bos=False)
                return out[0, ids.shape[1]:].tolist()
            model.add_sae(sae, use_error_term=True)
            try:
                with model.hooks(fwd_hooks=[(acts, pin)]):
                    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, stop_at_eos=False,
                                         verbose=False, prepend_bos=False)
            finally:
                model.reset_saes()
        return out[0, ids.shape[1]:].tolist()  # (new_tokens,)

    def codes() -> list[dict[str, list[float]]]:
        index, values, _ = decompose(stop=True)
        return [{"ids": i.tolist(), "values": v.tolist()} for i, v in zip(index, values, strict=True)]

    def check_export(path: str) -> dict[str, Any]:
        exported = SAE.load_from_disk(path, device="cpu")
        with torch.no_grad():
            _, cache = model.run_with_cache(ids, names_filter=hook, stop_at_layer=layer + 1)
            x = cache[hook][0]  # (T, d_in)
            ours, theirs = sae.encode(x), exported.encode(x)  # (T, d_sae)
        same_support = bool(((ours != 0) == (theirs != 0)).all())
        return {"architecture": exported.cfg.architecture(), "max_abs_code_diff": float((ours - theirs).abs().max()),
                "max_abs_code": float(ours.abs().max()), "same_active_features": same_support,
                "tokens": int(x.shape[0])}

    calls: dict[str, Callable[..., Any]] = {
        "cache": lambda: decompose(stop=False), "cache_stop": lambda: decompose(stop=True),
        "generate": generate, "generate_plain": lambda: generate(steered=False), "codes": codes,
        "check_export": check_export,
        "hf_body": lambda: hf.model(input_ids=ids, use_cache=False),  # control: plain HF body in this process
    }
    info = {"versions": worker.versions("sae-lens", "transformer-lens", "transformers"),
            "torch_threads": torch.get_num_threads(), "tl_model": TL_NAME, "hook": hook,
            "sae": {"architecture": sae.cfg.architecture(), "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
                    "k": getattr(sae.cfg, "k", None)}}
    return calls, info


if __name__ == "__main__":
    worker.run(build)
