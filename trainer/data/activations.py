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

Under torchrun every rank plans the same batches from the token ids alone (`plan_batches`: cheap next to
the forward passes), runs a contiguous, equal share of them, and writes the rows into the one store by
their global row index (`trainer.data.shard_writer`): the shards, hashes and manifest are byte for byte
those of a single process, whatever the number of ranks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from core.host.host_model import HostModel
from trainer.data.corpus import Document
from trainer.data.shard_writer import ShardWriter, assemble_pieces, hookpoint_stats, prepare_directory
from trainer.data.shards import (
    DOC_INDEX,
    DOC_POSITION,
    STORAGE_DTYPES,
    TOKEN_IDS,
    ActivationManifest,
    ActivationStoreError,
    iterate_batches,
)
from trainer.training.distributed import LOCAL, Distributed

logger = logging.getLogger(__name__)

# Documents per tokenizer call (the fast tokenizer batches them in Rust): few at first, so that a small token
# cap does not tokenise 64 long documents up front, then doubling up to the cap.
_TOKENIZE_GROUP_FIRST, _TOKENIZE_GROUP = 4, 64


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
    first, size = 0, _TOKENIZE_GROUP_FIRST
    while group := list(islice(docs, size)):
        encoded = tokenizer([d.text for d in group], add_special_tokens=False, verbose=False)["input_ids"]
        for offset, ids in enumerate(encoded):
            for start in range(0, len(ids), span):
                yield Window(first + offset, start, prefix + tuple(ids[start : start + span]), bool(prefix))
        first, size = first + len(group), min(2 * size, _TOKENIZE_GROUP)


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


@dataclass(frozen=True)
class PlannedBatch:
    """One batch of the collection plan: which of its positions become rows, and where those rows go."""

    index: int  # position in the plan
    batch: WindowBatch
    keep: Tensor  # (B, T) bool: real, non-special tokens within the max_tokens cap
    first_row: int  # global row index of the batch's first stored row
    rows: int  # number of stored rows, keep.sum()


def plan_batches(tokenizer: PreTrainedTokenizerBase, documents: Iterable[Document], *, context_length: int,
                 batch_size: int, max_tokens: int | None) -> Iterator[PlannedBatch]:
    """The batches of a collection, from the token ids alone (no model): the same on every rank, so each can
    find its slice and the global row offsets without running the others' batches. Ends with the batch that
    reaches `max_tokens` stored rows (None: every document)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    skipped_ids = torch.tensor(special_token_ids(tokenizer), dtype=torch.int64)
    first_row = 0
    windows = iter_windows(tokenizer, documents, context_length)
    for index, batch in enumerate(batch_windows(windows, batch_size, pad_id)):
        keep = batch.attention_mask.bool() & ~torch.isin(batch.input_ids, skipped_ids)  # (B, T)
        if max_tokens is not None:
            keep &= keep.flatten().cumsum(0).view_as(keep) <= max_tokens - first_row
        rows = int(keep.sum())
        yield PlannedBatch(index, batch, keep, first_row, rows)
        first_row += rows
        if max_tokens is not None and first_row >= max_tokens:
            return


@dataclass(frozen=True)
class Slice:
    """The plan batches [first, end) one rank runs, their global rows, and what the whole plan adds up to."""

    first: int
    end: int | None  # None: to the end of the plan (one process)
    first_row: int
    ends_store: bool
    windows: int = 0  # of the whole plan (0 until counted)
    documents: int = 0  # documents with stored rows (a prefix of the document order)


def rank_slice(plan: Iterator[PlannedBatch], parallel: Distributed) -> Slice:
    """A contiguous, equal share of the plan's batches for this rank (every rank counts the whole plan)."""
    if parallel.world == 1:
        return Slice(0, None, 0, True)
    rows, windows, documents = [], 0, 0
    for p in plan:
        rows.append(p.rows)
        windows += p.batch.num_windows
        if p.rows:
            documents = int(p.batch.doc_index[p.keep].max()) + 1
    first, end = (len(rows) * r // parallel.world for r in (parallel.rank, parallel.rank + 1))
    return Slice(first, end, sum(rows[:first]), end == len(rows), windows, documents)


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
    parallel: Distributed = LOCAL,
    corpus: Mapping[str, Any] | None = None,
) -> ActivationManifest:
    """Run the host model over `documents` and store the activations at `hookpoints` (one forward pass
    per batch for all of them) until `max_tokens` rows are stored (None: every document). `corpus` is the
    text's provenance, recorded as is in the manifest.

    Under torchrun every rank calls this with the same arguments and runs its own slice of the batches; the
    store is byte for byte the one a single process writes. Returns the manifest (on every rank), also written
    to `out_dir/manifest.json` after the last shard.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"unknown storage dtype {dtype!r}; use {', '.join(STORAGE_DTYPES)}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 (or None for the whole corpus), got {max_tokens}")
    points = host.hookpoints.resolve(list(hookpoints))  # unknown names fail here, before any work
    names, dims = [p.name for p in points], {p.name: p.dim for p in points}
    directory = Path(out_dir)
    refusal = None
    if parallel.is_main:
        try:
            prepare_directory(directory, overwrite=overwrite)
        except FileExistsError as exc:
            refusal = str(exc)
    if (refusal := parallel.main_value(refusal)) is not None:  # every rank raises; none waits on the others
        raise FileExistsError(refusal)
    documents = documents if parallel.world == 1 else list(documents)  # iterated twice: count, then run

    def plan() -> Iterator[PlannedBatch]:
        return plan_batches(host.tokenizer, documents, context_length=context_length, batch_size=batch_size,
                            max_tokens=max_tokens)

    mine = rank_slice(plan(), parallel)
    writer = ShardWriter(directory, dims, dtype, shard_tokens, first_row=mine.first_row, ends_store=mine.ends_store)
    windows = documents_used = 0
    started = time.perf_counter()
    bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="activations", disable=not progress)
    with bar:
        for p in islice(plan(), mine.first, mine.end):
            # No attention mask: windows are right-padded and attention is causal, so no real position sees
            # padding; without a mask HF takes its plain causal path (a mask costs ~10% of the forward).
            result = host.forward(p.batch.input_ids, reads=names)
            keep_dev = p.keep.to(host.device)
            rows = {name: result.captures[name][keep_dev] for name in names}  # (n, d) each
            metadata = {TOKEN_IDS: p.batch.input_ids[p.keep], DOC_INDEX: p.batch.doc_index[p.keep],
                        DOC_POSITION: p.batch.doc_position[p.keep]}
            writer.add(rows, metadata, batch=p.index)
            windows += p.batch.num_windows
            if p.rows:
                documents_used = int(metadata[DOC_INDEX].max()) + 1
            bar.update(p.rows)
        writer.close()
    manifest = _finish(writer, parallel, mine, ActivationManifest(
        directory=directory, model=host.name, hookpoints=tuple(names), dtype=dtype, context_length=context_length,
        total_tokens=writer.total_tokens, shards=(), stats={}, documents=documents_used, windows=windows,
        bos_token_id=host.tokenizer.bos_token_id, skipped_token_ids=tuple(special_token_ids(host.tokenizer)),
        corpus=corpus,
    ))
    elapsed = time.perf_counter() - started
    logger.info("collected %d tokens at %d hookpoints in %.1fs (%.0f tokens/s on %d ranks) into %s",
                manifest.total_tokens, len(names), elapsed, manifest.total_tokens / max(elapsed, 1e-9),
                parallel.world, directory)
    return manifest


def _finish(writer: ShardWriter, parallel: Distributed, mine: Slice, draft: ActivationManifest) -> ActivationManifest:
    """Join the ranks' shards (assembling the shards two ranks share), sum the statistics and save the manifest."""
    shards = dict(writer.shards)
    total, sums = writer.total_tokens, writer.batch_sums
    if parallel.world > 1:
        gathered = parallel.gather_objects((writer.shards, writer.pieces, writer.batch_sums, writer.total_tokens))
        pieces = [piece for _, ranks_pieces, _, _ in gathered for piece in ranks_pieces]
        split = sorted({piece.shard for piece in pieces})
        assembled = assemble_pieces(draft.directory, pieces, split[parallel.rank :: parallel.world])
        shards = {i: s for whole, _, _, _ in gathered for i, s in whole.items()}
        for done in parallel.gather_objects(assembled):
            shards.update(done)
        sums = {b: s for _, _, rank_sums, _ in gathered for b, s in rank_sums.items()}
        total = sum(t for _, _, _, t in gathered)
        draft = replace(draft, documents=mine.documents, windows=mine.windows)
    manifest = replace(draft, total_tokens=total, shards=tuple(shards[i] for i in sorted(shards)),
                       stats=hookpoint_stats(writer.dims, (sums[b] for b in sorted(sums)), total))
    if parallel.is_main:
        manifest.save()
    parallel.barrier()  # the manifest exists before any rank goes on to read the store
    return manifest


__all__ = [
    "ActivationManifest",
    "ActivationStoreError",
    "PlannedBatch",
    "Window",
    "WindowBatch",
    "batch_windows",
    "collect_activations",
    "iter_windows",
    "iterate_batches",
    "plan_batches",
    "special_token_ids",
]
