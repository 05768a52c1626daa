"""Collect host-model activations at several hookpoints into an on-disk store (see `trainer.data.shards`).

Tokenisation: each document is tokenised on its own, without special tokens, and cut into windows of
at most `context_length` tokens, each starting with BOS, so every window is a valid model input that
looks like the start of a sequence (what the service sees for a fresh request). The tail window of a
document is right-padded instead of packed with the next document: packing would let tokens attend
across unrelated documents, and right padding leaves every real position's activation exactly what an
unpadded forward pass gives (causal attention never looks right). Batches are padded only to their
longest window, so the padding cost is the short tails.

Collection: one forward pass per batch reads every hookpoint at once (stopping after the last one),
and keeps only real, non-special tokens (no BOS, pad, EOS, ...): BOS activations are huge outliers
that SAEs should not spend capacity on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from core.host.host_model import HostModel
from trainer.data.corpus import Document
from trainer.data.shards import (
    DOC_INDEX,
    DOC_POSITION,
    STORAGE_DTYPES,
    TOKEN_IDS,
    ActivationManifest,
    ActivationStoreError,
    ShardWriter,
    iterate_batches,
    prepare_directory,
)

logger = logging.getLogger(__name__)

_TOKENIZE_GROUP = 64  # documents per tokenizer call: the fast tokenizer batches them in Rust


@dataclass(frozen=True)
class Window:
    """One model input: BOS (when the tokenizer has one) + up to context_length - 1 document tokens."""

    doc_index: int  # index of the document in the sequence given to `iter_windows`
    start: int  # position of the window's first document token among the document's tokens
    ids: tuple[int, ...]
    has_bos: bool


@dataclass(frozen=True)
class WindowBatch:
    input_ids: Tensor  # (B, T) int64, right-padded with the pad id
    attention_mask: Tensor  # (B, T) int64, 1 on real tokens (BOS included), 0 on padding
    doc_index: Tensor  # (B, T) int32, -1 on padding
    doc_position: Tensor  # (B, T) int32, position among the document's tokens; -1 on BOS and padding
    num_windows: int


def iter_windows(tokenizer: PreTrainedTokenizerBase, documents: Iterable[Document],
                 context_length: int) -> Iterator[Window]:
    """The windows of every document, in document order (empty documents give none)."""
    bos = tokenizer.bos_token_id
    span = context_length - (1 if bos is not None else 0)  # document tokens per window
    if span < 1:
        raise ValueError(f"context_length must leave room for at least one token after BOS, got {context_length}")
    prefix = (bos,) if bos is not None else ()
    docs = iter(documents)
    first = 0
    while group := list(islice(docs, _TOKENIZE_GROUP)):
        encoded = tokenizer([d.text for d in group], add_special_tokens=False, verbose=False)["input_ids"]
        for offset, ids in enumerate(encoded):
            for start in range(0, len(ids), span):
                yield Window(first + offset, start, prefix + tuple(ids[start : start + span]), bool(prefix))
        first += len(group)


def batch_windows(windows: Iterable[Window], batch_size: int, pad_id: int) -> Iterator[WindowBatch]:
    """Group windows into right-padded batches, each padded to its own longest window."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    it = iter(windows)
    while group := list(islice(it, batch_size)):
        width = max(len(w.ids) for w in group)
        shape = (len(group), width)
        input_ids = torch.full(shape, pad_id, dtype=torch.int64)
        mask = torch.zeros(shape, dtype=torch.int64)
        doc_index = torch.full(shape, -1, dtype=torch.int32)
        doc_position = torch.full(shape, -1, dtype=torch.int32)
        for row, w in enumerate(group):
            n = len(w.ids)
            bos = int(w.has_bos)
            input_ids[row, :n] = torch.tensor(w.ids)
            mask[row, :n] = 1
            doc_index[row, :n] = w.doc_index
            doc_position[row, bos:n] = torch.arange(w.start, w.start + n - bos, dtype=torch.int32)
        yield WindowBatch(input_ids, mask, doc_index, doc_position, len(group))


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids never stored as training rows: BOS, pad, EOS, UNK and any other special token."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i in (tokenizer.bos_token_id, tokenizer.pad_token_id) if i is not None)
    return sorted(ids)


def collect_activations(
    host: HostModel,
    documents: Iterable[Document],
    hookpoints: Sequence[str],
    *,
    out_dir: str | Path,
    context_length: int = 128,
    batch_size: int = 16,
    max_tokens: int | None = None,
    dtype: str = "float32",
    shard_tokens: int = 1 << 16,
    overwrite: bool = False,
    progress: bool = True,
) -> ActivationManifest:
    """Run the host model over `documents` and store the activations at `hookpoints` (one forward pass
    per batch for all of them) until `max_tokens` rows are stored (None: every document).

    Returns the manifest, also written to `out_dir/manifest.json` after the last shard.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"unknown storage dtype {dtype!r}; use {', '.join(STORAGE_DTYPES)}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 (or None for the whole corpus), got {max_tokens}")
    points = host.hookpoints.resolve(list(hookpoints))  # unknown names fail here, before any work
    names = [p.name for p in points]
    directory = Path(out_dir)
    prepare_directory(directory, overwrite=overwrite)
    tokenizer = host.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    skipped = special_token_ids(tokenizer)
    skipped_ids = torch.tensor(skipped, dtype=torch.int64)
    writer = ShardWriter(directory, {p.name: p.dim for p in points}, dtype, shard_tokens)
    windows = documents_used = 0
    started = time.perf_counter()
    bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="activations", disable=not progress)
    with bar:
        for batch in batch_windows(iter_windows(tokenizer, documents, context_length), batch_size, pad_id):
            keep = batch.attention_mask.bool() & ~torch.isin(batch.input_ids, skipped_ids)  # (B, T)
            if max_tokens is not None:
                keep &= keep.flatten().cumsum(0).view_as(keep) <= max_tokens - writer.total_tokens
            result = host.forward(batch.input_ids, reads=names, attention_mask=batch.attention_mask)
            keep_dev = keep.to(host.device)
            rows = {name: result.captures[name][keep_dev] for name in names}  # (n, d) each
            metadata = {TOKEN_IDS: batch.input_ids[keep], DOC_INDEX: batch.doc_index[keep],
                        DOC_POSITION: batch.doc_position[keep]}
            writer.add(rows, metadata)
            windows += batch.num_windows
            if len(metadata[DOC_INDEX]):
                documents_used = int(metadata[DOC_INDEX].max()) + 1
            bar.update(len(metadata[TOKEN_IDS]))
            if max_tokens is not None and writer.total_tokens >= max_tokens:
                break
    stats = writer.close()
    elapsed = time.perf_counter() - started
    manifest = ActivationManifest(
        directory=directory, model=host.name, hookpoints=tuple(names), dtype=dtype,
        context_length=context_length, total_tokens=writer.total_tokens, shards=tuple(writer.shards),
        stats=stats, documents=documents_used, windows=windows, bos_token_id=tokenizer.bos_token_id,
        skipped_token_ids=tuple(skipped),
    )
    manifest.save()
    logger.info("collected %d tokens at %d hookpoints in %.1fs (%.0f tokens/s) into %s",
                writer.total_tokens, len(names), elapsed, writer.total_tokens / max(elapsed, 1e-9), directory)
    return manifest


__all__ = [
    "ActivationManifest",
    "ActivationStoreError",
    "Window",
    "WindowBatch",
    "batch_windows",
    "collect_activations",
    "iter_windows",
    "iterate_batches",
    "special_token_ids",
]
