"""A KV-cached batched sampling loop with exact nucleus (top-p) sampling that avoids sorting the vocabulary.

HF `generate` applies top-p by sorting every row's logits over the whole vocabulary at every step; with
Gemma 3's 262,144 tokens that sort cost as much as the unembedding itself on a 2-core CPU. Here the nucleus
is found among the row's 1,024 most likely tokens (one `topk`, linear in the vocabulary): when their
probability mass reaches top_p the nucleus lies inside them, which is exact; a row whose candidates fall
short (a flat distribution) tries 16,384, then the full sort. The prompt pass computes logits for the last
position only. Rows are left-padded; position ids follow the attention mask, as HF `generate` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

CANDIDATE_TIERS = (1024, 16384)
"""Sizes of the candidate sets tried in turn before the full sort (a flat distribution, e.g. right after BOS,
needs more than 1,024 tokens to reach top_p)."""


def nucleus_sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator) -> Tensor:
    """One token per row of logits (B, V), sampled at `temperature` from the smallest set of most likely tokens
    whose probability reaches `top_p` (Holtzman et al. 2020); the token at which the mass crosses top_p is kept."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    choice = torch.empty(probs.shape[0], dtype=torch.int64)
    pending = torch.arange(probs.shape[0])
    for k in (*CANDIDATE_TIERS, probs.shape[-1]):  # the last tier is the full sort: always enough mass
        k = min(k, probs.shape[-1])
        top, index = torch.topk(probs[pending], k, dim=-1)  # (b, k), sorted descending
        enough = (top.sum(-1) >= top_p) | (k == probs.shape[-1])  # (b,)
        if bool(enough.any()):
            choice[pending[enough]] = _sample_sorted(top[enough], index[enough], top_p, generator)
        pending = pending[~enough]
        if not len(pending):
            break
    return choice


def _sample_sorted(probs: Tensor, index: Tensor, top_p: float, generator: torch.Generator) -> Tensor:
    """Sample from descending probabilities (B, k) with vocabulary ids `index`, truncated to the nucleus."""
    before = torch.cumsum(probs, dim=-1) - probs  # (B, k) mass of the more likely tokens
    kept = torch.where(before < top_p, probs, torch.zeros_like(probs))  # the first token is always kept
    picked = torch.multinomial(kept, 1, generator=generator)  # (B, 1)
    return index.gather(1, picked).squeeze(1)


@torch.inference_mode()
def sample_batch(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, *, max_new_tokens: int,
                 temperature: float, top_p: float, eos_ids: set[int], pad_id: int, seed: int,
                 banned_ids: Sequence[int] = ()) -> Tensor:
    """New token ids (B, N ≤ max_new_tokens) continuing left-padded `input_ids` (B, T); rows that have emitted
    EOS get `pad_id` afterwards, and the loop stops once every row has. `banned_ids` are never sampled (their
    probability goes to the other tokens)."""
    device = input_ids.device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    mask = attention_mask.clone()  # (B, T + steps)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    cache = DynamicCache()
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                use_cache=True, logits_to_keep=1)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.int64)
    banned = torch.tensor(sorted(banned_ids), dtype=torch.int64)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    position = positions[:, -1:]  # (B, 1)
    steps: list[Tensor] = []
    for step in range(max_new_tokens):
        logits = out.logits[:, -1, :].cpu()  # (B, V)
        if len(banned):
            logits = logits.index_fill(1, banned, float("-inf"))
        token = nucleus_sample(logits, temperature, top_p, generator)  # (B,)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        steps.append(token)
        done |= torch.isin(token, eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        out = model(input_ids=token[:, None].to(device), attention_mask=mask, position_ids=position,
                    cache=cache, use_cache=True, logits_to_keep=1)
    return torch.stack(steps, dim=1)  # (B, N)
