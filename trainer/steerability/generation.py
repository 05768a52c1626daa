"""Batched steered generation and the teacher-forced re-read, on the host model and the stack runtime.

One batch holds many rows: an opening, the edit of one feature of one stage (or none: the default branch) and a
decoding rule (greedy, or sampling from the row's own seeded generator, so a row's text does not depend on the
other rows of its batch). Prompts are left-padded and decoded with one batched KV cache (transformers'
`DynamicCache`), as a plain batched `generate` would; one write hook at the stage's hookpoint edits every edited
row with its own feature and amount, error-preserving like the engine (core/stack/runtime.py):
h' = h + (z'_f − z_f) · W_dec[f] / s, so ADD a adds a · W_dec[f] / s and SET a adds (a − z_f) · W_dec[f] / s,
with z_f encoded from what arrives (and, for a residual stage, what flowed at its source stage). The edit covers
every position, prompt and generated.

The re-read runs prompt + continuation through the model with no edit and returns the cross-entropy of each
generated token and the codes of the chosen features there: the stage's own view of what was generated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from core.host.hooks import ActivationEdit, installed_hooks
from core.host.host_model import HostModel
from core.stack.runtime import RuntimeStage, StackRuntime


@dataclass(frozen=True)
class RowEdit:
    """One row's edit: ADD `amount` to, or SET to `amount`, the code of `feature`; feature -1 is no edit."""

    feature: int = -1
    op: str = "add"
    amount: float = 0.0


NO_EDIT = RowEdit()


@dataclass(frozen=True)
class Row:
    prompt: tuple[int, ...]  # the opening's token ids (BOS included)
    edit: RowEdit
    seed: int | None  # None: greedy; else sampled with a generator seeded with it


@dataclass(frozen=True)
class Generated:
    tokens: Tensor  # (R, N) int64, on the CPU
    valid: Tensor  # (R, N) bool: before the row's first end-of-sequence token


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-padded ids (R, L) and their 0/1 attention mask (R, L)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.int64)
        mask[i, width - len(prompt):] = 1
    return ids, mask


class StageEditor:
    """The write hooks of one batch: each edited row's feature code changes by its own ADD or SET."""

    def __init__(self, runtime: StackRuntime, stage: RuntimeStage, edits: Sequence[RowEdit]) -> None:
        self.runtime, self.stage = runtime, stage
        device, dtype = stage.sae.W_dec.device, stage.sae.W_dec.dtype
        self.rows = torch.tensor([i for i, e in enumerate(edits) if e.feature >= 0], dtype=torch.long, device=device)
        edited = [edits[i] for i in self.rows.tolist()]
        features = torch.tensor([e.feature for e in edited], dtype=torch.long, device=device)
        self.features = features
        self.directions = stage.sae.W_dec[features] / stage.input_scale  # (E, d)
        self.amounts = torch.tensor([e.amount for e in edited], dtype=dtype, device=device)  # (E,)
        self.is_set = torch.tensor([e.op == "set" for e in edited], dtype=torch.bool, device=device)  # (E,)
        self._prev: Tensor | None = None

    def writes(self) -> dict[str, ActivationEdit]:
        if not len(self.rows):
            return {}
        writes: dict[str, ActivationEdit] = {self.stage.hookpoint: self._edit}
        if self.stage.residual_of is not None and bool(self.is_set.any()):
            writes[self.runtime.stages[self.stage.residual_of].hookpoint] = self._record_prev
        return writes

    def _record_prev(self, h: Tensor) -> Tensor:  # (B, T, d) what flows at the source stage: unchanged
        self._prev = h
        return h

    def _edit(self, h: Tensor) -> Tensor:  # h: (B, T, d)
        rows = self.rows.to(h.device)
        amount = self.amounts[:, None].expand(-1, h.shape[1]).clone()  # (E, T) code change z'_f − z_f
        if bool(self.is_set.any()):
            setting = self.is_set.nonzero(as_tuple=True)[0]  # (S,)
            picked = rows[setting]
            prev = None if self._prev is None else self._prev[picked]
            z = self.runtime.encode(self.stage, h[picked], prev).reshape(len(picked), h.shape[1], -1)  # (S, T, H)
            current = z.gather(2, self.features[setting][:, None, None].expand(-1, h.shape[1], 1))[..., 0]  # (S, T)
            amount[setting] = self.amounts[setting][:, None] - current
        delta = amount[..., None] * self.directions[:, None, :]  # (E, T, d)
        out = h.clone()
        out[rows] = h[rows] + delta.to(h.dtype)
        return out


def _eos_ids(host: HostModel) -> list[int]:
    eos = host.model.generation_config.eos_token_id
    if eos is None:
        eos = host.tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


@torch.inference_mode()
def generate_rows(host: HostModel, runtime: StackRuntime, stage: RuntimeStage, rows: Sequence[Row],
                  max_new_tokens: int, temperature: float) -> Generated:
    """Continue every row by `max_new_tokens` tokens in one batch (rows keep decoding past their end-of-sequence
    token, which `valid` masks, so the batch stays rectangular)."""
    device = host.device
    pad_id = host.tokenizer.pad_token_id if host.tokenizer.pad_token_id is not None else 0
    ids, mask = left_pad([row.prompt for row in rows], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # (R, L)
    sampled = [i for i, row in enumerate(rows) if row.seed is not None]
    generators = {i: torch.Generator(device=device).manual_seed(int(rows[i].seed)) for i in sampled}  # type: ignore[arg-type]
    editor = StageEditor(runtime, stage, [row.edit for row in rows])
    tokens = torch.empty((len(rows), max_new_tokens), dtype=torch.int64, device=device)
    cache = DynamicCache()
    with installed_hooks(host.hookpoints, (), editor.writes()):
        out = host.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                         logits_to_keep=1)
        for step in range(max_new_tokens):
            logits = out.logits[:, -1].float()  # (R, V)
            chosen = logits.argmax(-1)  # (R,)
            if sampled:
                probs = torch.softmax(logits[sampled] / temperature, dim=-1)  # (S, V)
                for j, i in enumerate(sampled):
                    chosen[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
            tokens[:, step] = chosen
            if step + 1 == max_new_tokens:
                break
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            positions = positions[:, -1:] + 1
            out = host.model(input_ids=chosen[:, None], attention_mask=mask, position_ids=positions, cache=out.cache,
                             use_cache=True, logits_to_keep=1)
    tokens = tokens.cpu()
    ended = torch.isin(tokens, torch.tensor(_eos_ids(host), dtype=torch.int64))  # (R, N)
    valid = ended.to(torch.int64).cumsum(1) == 0
    return Generated(tokens, valid)


@dataclass(frozen=True)
class ReRead:
    ce: Tensor  # (R, N) float32 nats of each generated token under the unedited model
    codes: Tensor  # (R, N, F) float32 the chosen features' codes at each generated token


@torch.inference_mode()
def reread(host: HostModel, runtime: StackRuntime, stage: RuntimeStage, prompts: Sequence[Sequence[int]],
           continuations: Tensor, features: Sequence[int], batch_rows: int = 16) -> ReRead:
    """Teacher-forced, unedited: each prompt + continuation (R, N) through the model, in chunks of `batch_rows`."""
    n = continuations.shape[1]
    pad_id = host.tokenizer.pad_token_id if host.tokenizer.pad_token_id is not None else 0
    columns = torch.as_tensor(list(features), dtype=torch.long, device=stage.sae.W_dec.device)
    source = None if stage.residual_of is None else runtime.stages[stage.residual_of].hookpoint
    reads = [stage.hookpoint] + ([source] if source else [])
    ces, codes = [], []
    for lo in range(0, len(prompts), batch_rows):
        part = continuations[lo:lo + batch_rows]
        ids, mask = left_pad([list(p) + c for p, c in zip(prompts[lo:lo + batch_rows], part.tolist(), strict=True)],
                             pad_id)
        ids, mask = ids.to(host.device), mask.to(host.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        with installed_hooks(host.hookpoints, reads) as captures:
            out = host.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                             logits_to_keep=n + 1)
        logits = out.logits[:, :n].float()  # (r, N, V): position j predicts generated token j
        picked = logits.gather(2, part.to(logits.device)[..., None])[..., 0]  # (r, N)
        ces.append((torch.logsumexp(logits, dim=-1) - picked).cpu())  # (r, N) nats, without a second (r, N, V)
        h = captures[stage.hookpoint][:, -n:]  # (r, N, d)
        prev = None if source is None else captures[source][:, -n:]
        z = runtime.encode(stage, h, prev).reshape(h.shape[0], n, -1)  # (r, N, H)
        codes.append(z[..., columns].float().cpu())
    return ReRead(torch.cat(ces), torch.cat(codes))


@torch.inference_mode()
def next_token_probs(host: HostModel, runtime: StackRuntime, stage: RuntimeStage, rows: Sequence[Row]) -> Tensor:
    """One forward pass of the rows' prompts with their edits: the next-token distribution (R, V) at the end."""
    pad_id = host.tokenizer.pad_token_id if host.tokenizer.pad_token_id is not None else 0
    ids, mask = left_pad([row.prompt for row in rows], pad_id)
    ids, mask = ids.to(host.device), mask.to(host.device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    editor = StageEditor(runtime, stage, [row.edit for row in rows])
    with installed_hooks(host.hookpoints, (), editor.writes()):
        out = host.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=1)
    return torch.softmax(out.logits[:, -1].float(), dim=-1).cpu()
