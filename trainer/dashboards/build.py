"""`featurewire-train dashboards`: one streaming pass of the host model over held-out text that fills every stage's
dashboard accumulators from the same forward (ReSAE stages from the activations that actually flowed), then the
direction-only parts (logit lens, neighbours), written into the stack as hashed files.

Under torchrun each rank takes every world-th document of the selection (global document indices are kept), and
the accumulators are all-gathered and merged on rank 0, which writes the stack: counts, histograms and example
choices equal a single process's; float sums agree to rounding.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from core.host.host_model import HostModel
from core.stack.identity import HostModelIdentity
from core.stack.reader import LoadedStack, read_stack
from core.stack.runtime import StackRuntime
from core.stack.writer import attach_dashboards
from trainer.dashboards.accumulator import BatchTokens, DashboardSettings
from trainer.dashboards.directions import logit_lens, neighbours, stage_directions
from trainer.dashboards.labels import RECORD_BYTES
from trainer.dashboards.stage import StageAccumulator
from trainer.data.activations import batch_windows, iter_windows, special_token_ids
from trainer.data.corpus import Document
from trainer.training.distributed import LOCAL, Distributed

log = logging.getLogger(__name__)


def select_documents(host: HostModel, documents: Sequence[Document], max_tokens: int) -> list[Document]:
    """The leading documents whose tokens reach `max_tokens` (the same selection on every rank)."""
    chosen, seen = [], 0
    for document in documents:
        if seen >= max_tokens:
            break
        chosen.append(document)
        seen += len(host.tokenizer(document.text, add_special_tokens=False, verbose=False)["input_ids"])
    return chosen


@torch.no_grad()
def accumulate(host: HostModel, runtime: StackRuntime, documents: Sequence[Document], settings: DashboardSettings, *,
               context_length: int, batch_size: int, max_tokens: int, parallel: Distributed = LOCAL,
               progress: bool = True) -> tuple[list[StageAccumulator], dict[str, Any]]:
    """Run the pass over this rank's documents; returns the merged accumulators (on rank 0) and pass statistics."""
    accumulators = [StageAccumulator(s.sae.d_sae, bool(s.sae.signed), settings, host.device) for s in runtime.stages]
    mine = list(range(parallel.rank, len(documents), parallel.world))  # global index of each local document
    pad_id = host.tokenizer.pad_token_id if host.tokenizer.pad_token_id is not None else 0
    special = torch.tensor(special_token_ids(host.tokenizer), dtype=torch.int64)
    index_of = torch.tensor(mine, dtype=torch.long)
    seen, started = 0, time.perf_counter()
    bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="dashboards", disable=not progress)
    windows = iter_windows(host.tokenizer, [documents[i] for i in mine], context_length)
    for batch in batch_windows(windows, batch_size, pad_id):
        keep = batch.attention_mask.bool() & ~torch.isin(batch.input_ids, special)  # (R, T)
        captures = host.forward(batch.input_ids, reads=runtime.hookpoints, attention_mask=batch.attention_mask).captures
        tokens = _batch_tokens(batch.input_ids, keep, batch.doc_index, batch.doc_position, index_of, host.device)
        kept = keep.to(host.device)
        flowed = {hp: captures[hp][kept] for hp in runtime.hookpoints}  # (N, d)
        for stage, accumulator in zip(runtime.stages, accumulators, strict=True):
            prev = None if stage.residual_of is None else flowed[runtime.stages[stage.residual_of].hookpoint]
            accumulator.update(runtime.encode(stage, flowed[stage.hookpoint], prev), tokens)  # codes (N, H)
        seen += int(tokens.doc.numel())
        bar.update(int(tokens.doc.numel()))
    bar.close()
    spilled = sum(a.spill.records for a in accumulators) * RECORD_BYTES
    for accumulator in accumulators:  # exact token labels from every rank's firings (trainer/dashboards/labels.py)
        accumulator.finish_labels(parallel)
    seconds = time.perf_counter() - started
    stats = {"tokens": seen, "documents": len(mine), "seconds": seconds, "label_file_bytes": spilled}
    if parallel.world > 1:
        accumulators, stats = _merge_ranks(accumulators, stats, parallel)
    return accumulators, stats


def _batch_tokens(ids: torch.Tensor, keep: torch.Tensor, doc_index: torch.Tensor, doc_position: torch.Tensor,
                  global_index: torch.Tensor, device: torch.device) -> BatchTokens:
    cell = keep.reshape(-1).nonzero(as_tuple=True)[0]  # (N,)
    kept_index = torch.full((keep.numel(),), -1, dtype=torch.long)
    kept_index[cell] = torch.arange(cell.numel())
    doc = global_index[doc_index.reshape(-1)[cell].long()]
    pos = doc_position.reshape(-1)[cell].long()
    return BatchTokens(ids.to(device), cell.to(device), doc.to(device), pos.to(device), kept_index.to(device))


def _merge_ranks(accumulators: list[StageAccumulator], stats: dict[str, Any],
                 parallel: Distributed) -> tuple[list[StageAccumulator], dict[str, Any]]:
    """All-gather every rank's accumulator states and pass statistics; rank 0 merges them in rank order."""
    payload = ([{k: v.cpu() for k, v in a.state().items()} for a in accumulators], stats)
    gathered: list[Any] = [None] * parallel.world
    dist.all_gather_object(gathered, payload)
    if not parallel.is_main:
        return accumulators, stats
    merged = []
    for i, accumulator in enumerate(accumulators):
        accumulator.load_state({k: v.to(accumulator.device) for k, v in gathered[0][0][i].items()})
        for states, _ in gathered[1:]:
            other = StageAccumulator(accumulator.d_sae, accumulator.signed, accumulator.settings, accumulator.device)
            other.load_state({k: v.to(accumulator.device) for k, v in states[i].items()})
            accumulator.merge(other)
        merged.append(accumulator)
    total = {"tokens": sum(s["tokens"] for _, s in gathered), "documents": sum(s["documents"] for _, s in gathered),
             "seconds": max(s["seconds"] for _, s in gathered),
             "label_file_bytes": max(s["label_file_bytes"] for _, s in gathered)}  # per rank, temporary
    return merged, total


def finish(host: HostModel, runtime: StackRuntime, accumulators: Sequence[StageAccumulator],
           settings: DashboardSettings) -> dict[int, dict[str, torch.Tensor]]:
    """The stored tensors of every stage: the accumulated parts plus logit lens and neighbours."""
    unembedding = host.model.get_output_embeddings().weight.detach()  # (V, d)
    vocab = min(unembedding.shape[0], len(host.tokenizer))
    out = {}
    for i, accumulator in enumerate(accumulators):
        tensors = accumulator.tensors()
        tensors |= logit_lens(stage_directions(runtime, i), unembedding, vocab, settings.logit_n)
        tensors |= neighbours(runtime, i, settings.neighbours)
        out[i] = tensors
    return out


def build_dashboards(stack_dir: str | Path, host: HostModel, documents: Sequence[Document], *, corpus: str,
                     settings: DashboardSettings, context_length: int = 128, batch_size: int = 8,
                     max_tokens: int = 50_000, parallel: Distributed = LOCAL, progress: bool = True) -> dict[str, Any]:
    """Compute and store every stage's dashboard; returns the pass summary (tokens, seconds, tokens/s)."""
    stack = read_stack(stack_dir, expect_model=HostModelIdentity.from_model(host.model, host.name), device=host.device)
    runtime = StackRuntime.from_loaded(stack)
    selected = select_documents(host, documents, max_tokens)
    accumulators, stats = accumulate(host, runtime, selected, settings, context_length=context_length,
                                     batch_size=batch_size, max_tokens=max_tokens, parallel=parallel, progress=progress)
    summary = {**stats, "tokens_per_second": stats["tokens"] / max(stats["seconds"], 1e-9), "world": parallel.world}
    if not parallel.is_main:
        return summary
    started = time.perf_counter()
    tensors = finish(host, runtime, accumulators, settings)
    records = {i: _record(a, stats, corpus, settings, context_length) for i, a in enumerate(accumulators)}
    attach_dashboards(stack_dir, {i: (tensors[i], records[i]) for i in tensors})
    summary["finish_seconds"] = time.perf_counter() - started
    return summary


def _record(accumulator: StageAccumulator, stats: dict[str, Any], corpus: str, settings: DashboardSettings,
            context_length: int) -> dict[str, Any]:
    extra = {k: v for k, v in asdict(settings).items() if k in ("bin_min", "bin_max", "seed")}
    return {**accumulator.shape.record(), "tokens": int(stats["tokens"]), "documents": int(stats["documents"]),
            "corpus": corpus, "context_length": context_length, **extra}


def describe(stack: LoadedStack) -> list[str]:
    """One line per stage: how many features fired and how often (for the CLI)."""
    lines = []
    for stage in stack.stages:
        if stage.dashboard is None:
            lines.append(f"{stage.name}: no dashboard")
            continue
        count, tokens = stage.dashboard["count"].sum(0), max(int(stage.dashboard_record.get("tokens", 0)), 1)
        density = count.double() / tokens
        line = (f"{stage.name}: {tokens:,} tokens, {int((count > 0).sum())}/{count.numel()} features fired, "
                f"median density {float(density.median()):.4f}, dense (>10%) {int((density > 0.1).sum())}")
        if "label_f1" in stage.dashboard:
            f1 = stage.dashboard["label_f1"][stage.dashboard["count"] > 0]  # every fired (feature, side)
            line += (f"; token-label F1 median {float(f1.median()):.2f}, >= 0.5 for {int((f1 >= 0.5).sum())}"
                     f"/{f1.numel()} (feature, sign)") if f1.numel() else ""
        lines.append(line)
    return lines
