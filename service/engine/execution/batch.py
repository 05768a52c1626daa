"""One forward pass over many sequences ("rows"), each with its own KV cache, positions and write hooks.

A row is one branch of one request at one step: new tokens at absolute positions [offset, offset + T_r)
on top of its cache, the write hooks of its own edit plan, and whether it needs next-token logits.
`run_rows` runs a group of rows as one left-padded batch through the host model and hands every row its
logits and its new cache.

KV caches use transformers' `DynamicCache` with full (`DynamicLayer`) layers for every attention layer,
also Gemma 3's sliding-window ones: the window is then enforced by the sliding-window attention mask that
the model builds from the 2-D padding mask, and a row's cache always holds every real position, so rows
can be re-stacked in any combination. A row's real entries are the last `length` positions of its batch
cache (left padding); a group that is exactly the previous batch, in order, reuses that cache as is
(steady-state decoding copies nothing beyond `DynamicLayer.update`); any other group is stacked afresh,
once per change of membership (a request joining or leaving).

Write hooks: at each hookpoint one hook visits only the rows that have an edit there, hands each its own
slice (1, T_r, d) of real positions (so a row's edit plan runs exactly as for a lone sequence) and
scatters the result back into a copy; rows without edits cost nothing and never see another row's state.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache

from core.host.hooks import ActivationEdit, StopForward, installed_hooks
from core.host.host_model import HostModel


@dataclass(frozen=True, eq=False)
class RowCache:
    """Where a row's KV entries live: the last `length` positions of row `row` of `batch`."""

    batch: DynamicCache
    row: int
    length: int
    rows: int  # the batch size of `batch`


@dataclass(eq=False)
class RowPass:
    """One row's part of a forward pass; `run_rows` fills `logits` and `new_cache`."""

    ids: Sequence[int]  # new tokens, at absolute positions [offset, offset + len(ids))
    offset: int
    cache: RowCache | None  # None before the row's first pass; then covers positions [0, offset)
    writes: dict[str, ActivationEdit] = field(default_factory=dict)
    need_logits: bool = True
    logits: Tensor | None = None  # (V,) next-token logits after the last new token
    new_cache: RowCache | None = None
    done: bool = False  # set by the scheduler once the pass ran

    @property
    def tokens(self) -> int:
        return len(self.ids)


def _stack_caches(rows: Sequence[RowPass], length: int) -> DynamicCache:
    """A fresh batch cache: every row's real entries, left-padded with zeros to `length`: (B, H, L, D)."""
    first = rows[0].cache
    assert first is not None
    layers = []
    for layer in range(len(first.batch.layers)):
        parts = []
        for kind in ("keys", "values"):
            template = getattr(first.batch.layers[layer], kind)  # (B', H, L', D)
            out = template.new_zeros((len(rows), template.shape[1], length, template.shape[3]))
            for i, row in enumerate(rows):
                cache = row.cache
                assert cache is not None
                source = getattr(cache.batch.layers[layer], kind)
                out[i, :, length - cache.length:] = source[cache.row, :, source.shape[2] - cache.length:]
            parts.append(out)
        layers.append((parts[0], parts[1]))
    return DynamicCache(ddp_cache_data=layers)


def _batch_cache(rows: Sequence[RowPass]) -> tuple[DynamicCache, int]:
    """The cache to run `rows` on and its length: reused when the rows are exactly its batch, in order."""
    caches = [row.cache for row in rows]
    if all(c is None for c in caches):
        return DynamicCache(), 0  # lazily filled with full layers: no sliding-window cropping
    if any(c is None for c in caches):
        raise ValueError("a batch mixes rows with and without a KV cache")
    first = caches[0]
    assert first is not None
    length = first.batch.get_seq_length()
    if all(c is not None and c.batch is first.batch and c.row == i and c.rows == len(rows)
           for i, c in enumerate(caches)):
        return _shallow_copy(first.batch), length
    length = max(c.length for c in caches if c is not None)
    return _stack_caches(rows, length), length


def _shallow_copy(cache: DynamicCache) -> DynamicCache:
    """The same tensors in new layer objects: `DynamicLayer.update` then rebinds the copy's tensors and
    leaves the rows' previous cache intact (a failed pass can be re-run; nothing is copied)."""
    clone = copy.copy(cache)
    clone.layers = [copy.copy(layer) for layer in cache.layers]
    return clone


def _inputs(rows: Sequence[RowPass], past: int, pad_id: int,
            device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Left-padded ids (B, T), position ids (B, T) and the padding mask over past + new positions (B, L + T)."""
    width = max(row.tokens for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    positions = torch.zeros((len(rows), width), dtype=torch.int64)
    mask = torch.zeros((len(rows), past + width), dtype=torch.int64)
    for i, row in enumerate(rows):
        n, held = row.tokens, row.cache.length if row.cache is not None else 0
        ids[i, width - n:] = torch.as_tensor(list(row.ids), dtype=torch.int64)
        positions[i, width - n:] = torch.arange(row.offset, row.offset + n)
        mask[i, past - held:past] = 1
        mask[i, past + width - n:] = 1
    return ids.to(device), positions.to(device), mask.to(device)


def _row_writes(rows: Sequence[RowPass], width: int) -> dict[str, ActivationEdit]:
    """One edit per hookpoint that applies each row's own edit to that row's real positions only."""
    by_hookpoint: dict[str, list[tuple[int, int, ActivationEdit]]] = {}
    for i, row in enumerate(rows):
        for hookpoint, edit in row.writes.items():
            by_hookpoint.setdefault(hookpoint, []).append((i, width - row.tokens, edit))

    def make(entries: list[tuple[int, int, ActivationEdit]]) -> ActivationEdit:
        def edit(h: Tensor) -> Tensor:  # h: (B, T, d)
            out = h
            for i, start, row_edit in entries:
                part = h[i:i + 1, start:]  # (1, T_r, d): this row's real positions
                new = row_edit(part)
                if new is not part:
                    if out is h:
                        out = h.clone()
                    out[i:i + 1, start:] = new
            return out

        return edit

    return {hookpoint: make(entries) for hookpoint, entries in by_hookpoint.items()}


def run_rows(host: HostModel, rows: Sequence[RowPass]) -> None:
    """Run `rows` as one batch: fills each row's `logits` (when it needs them) and `new_cache`.

    Rows either all start without a cache (prefill) or all carry one and add one token each (decode), so
    left padding never falls between a row's cached and new positions. When no row needs logits, the pass
    stops after the last hookpoint written (the rows are finishing and their caches are dropped).
    """
    if not rows:
        return
    device = host.device
    cache, past = _batch_cache(rows)
    if past and any(row.tokens != 1 for row in rows):
        raise ValueError("rows with a KV cache must add exactly one token per pass")
    pad_id = host.tokenizer.pad_token_id if host.tokenizer.pad_token_id is not None else 0
    ids, positions, mask = _inputs(rows, past, pad_id, device)
    writes = _row_writes(rows, ids.shape[1])
    logits = any(row.need_logits for row in rows)
    reads: list[str] = []
    if not logits:
        if not writes:
            return
        reads = [host.hookpoints.resolve(list(writes))[-1].name]
    kwargs: dict[str, Any] = {"cache": cache, "use_cache": True, "attention_mask": mask,
                              "position_ids": positions}
    if _accepts_logits_to_keep(host):
        kwargs["logits_to_keep"] = 1  # the unembedding of the last position only (real in every row)
    out = None
    hooks = installed_hooks(host.hookpoints, reads, writes, stop_after_reads=not logits)
    head = _few_rows_unembedding(host, len(rows)) if logits else contextlib.nullcontext()
    with torch.inference_mode(), hooks, head, contextlib.suppress(StopForward):
        out = host.model(input_ids=ids, **kwargs)
    if out is None or not logits:
        return
    batch = out.cache
    for i, row in enumerate(rows):
        held = row.cache.length if row.cache is not None else 0
        row.new_cache = RowCache(batch, i, held + row.tokens, len(rows))
        row.logits = out.logits[i, -1] if row.need_logits else None


@contextlib.contextmanager
def _few_rows_unembedding(host: HostModel, rows: int) -> Iterator[None]:
    """On CPU, compute the output projection of a few rows as W @ hᵀ instead of h @ Wᵀ for the pass.

    Same product, other operand order: CPU BLAS runs h @ Wᵀ with a (262k × 640) W and 2-16 rows two to
    three times slower than W @ hᵀ (measured with torch 2.13 on AMD EPYC: 8 rows 222 ms vs 106 ms; one
    row the same 55 ms), which made the unembedding most of a batched decode step of Gemma 3 270M. The
    model's own forward (e.g. Gemma's logit soft-capping) runs unchanged around it.
    """
    head = host.model.get_output_embeddings()
    if rows < 2 or host.device.type != "cpu" or type(head) is not torch.nn.Linear or "forward" in vars(head):
        yield
        return

    def forward(x: Tensor) -> Tensor:  # x: (B, T, d)
        flat = x.reshape(-1, x.shape[-1])  # (N, d)
        out = (head.weight @ flat.T).T  # (N, V)
        if head.bias is not None:
            out = out + head.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])

    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def _accepts_logits_to_keep(host: HostModel) -> bool:
    return "logits_to_keep" in inspect.signature(host.model.forward).parameters
