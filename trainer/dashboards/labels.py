"""LLM-free token labels, computed from the dashboard pass: per feature and sign, the tokens it fires on with the
share of its firing mass (Σ|z|) each holds, and the token detection score of the rule "the feature fires exactly
where the token is one of the label's tokens" over every token of the pass: precision = firings on the label's
tokens / occurrences of those tokens, recall = firings on them / all firings, F1 their harmonic mean.

Which tokens form the rule: the shortest prefix of the feature's tokens ranked by firing mass (at most
`label_n` of them) that maximises F1. Ranking by mass keeps the label about the tokens that carry the feature; the
unconstrained F1 optimum would be a prefix ranked by per-token precision instead, which collects every rare token
the feature happened to fire on (a token seen once with a firing raises F1 whenever F1 < 1), i.e. noise. The
smallest maximising prefix keeps the label short when a further token adds nothing. The rule is chosen and scored
on the same held-out tokens (the dashboard pass's, never seen in training); with at most `label_n` choices of
prefix the optimism this adds is small, and it is stated wherever the score is shown.

Exact with bounded memory: during the pass every firing is appended to a temporary file as (slot, token id,
|z|) records of 12 bytes (slot = side · H + feature; `FiringSpill`), and the pass's token histogram is counted
(`TokenCounts`, one vocabulary-sized vector). At the end the file is read back in blocks of slots whose firings
are at most `block_firings` (from the exact firing counts) and aggregated per (slot, token) exactly, chunk by
chunk; nothing is sampled or estimated, and the result does not depend on batch or document order. Under torchrun
each rank aggregates its own file per block and rank 0 sums the ranks' aggregates, so the labels equal a single
process's. RAM: the histogram plus one block's (slot, token) aggregates; disk: 12 bytes per firing, freed after.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from trainer.dashboards.accumulator import _rank_in_runs
from trainer.training.distributed import LOCAL, Distributed

RECORD_BYTES = 12  # int32 slot, int32 token id, float32 |z|
BLOCK_FIRINGS = 1 << 23  # firings of the slots aggregated together (their (slot, token) pairs are at most this)
CHUNK_RECORDS = 1 << 21  # records read from the file at once
LABEL_KEYS = ("label_ids", "label_share", "label_firings", "label_occurrences", "label_size", "label_precision",
              "label_recall", "label_f1")


class FiringSpill:
    """Every firing of one stage as (slot, token id, |z|) records in a temporary file (created on the first
    firing, removed by `close` or when the object is collected)."""

    def __init__(self) -> None:
        self._dir: tempfile.TemporaryDirectory | None = None
        self._file = None
        self.records = 0

    @property
    def path(self) -> Path:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="featurewire-labels-")
            self._file = (Path(self._dir.name) / "firings.bin").open("ab")
        return Path(self._dir.name) / "firings.bin"

    def add(self, slot: Tensor, token: Tensor, magnitude: Tensor) -> None:
        """Append firings: slot, token (nnz,) integer, magnitude (nnz,) > 0."""
        if slot.numel() == 0:
            return
        self.path  # noqa: B018 (opens the file)
        rows = torch.stack([slot.int(), token.int(), magnitude.float().view(torch.int32)], 1).cpu()  # (nnz, 3)
        self._file.write(rows.numpy().tobytes())
        self.records += rows.shape[0]

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def extend(self, other: FiringSpill) -> None:
        """Append another spill's records (merging the accumulators of two document slices)."""
        if other.records == 0:
            return
        other.flush()
        self.path  # noqa: B018
        with other.path.open("rb") as source:
            shutil.copyfileobj(source, self._file)
        self.records += other.records

    def chunks(self, records: int = CHUNK_RECORDS) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """(slot, token) int64 and |z| float32, (n,) each, for up to `records` records at a time."""
        if self.records == 0:
            return
        self.flush()
        with self.path.open("rb") as source:
            while data := source.read(records * RECORD_BYTES):
                rows = torch.frombuffer(bytearray(data), dtype=torch.int32).view(-1, 3)  # (n, 3)
                yield rows[:, 0].long(), rows[:, 1].long(), rows[:, 2].contiguous().view(torch.float32)

    def close(self) -> None:
        if self._dir is not None:
            self._file.close()
            self._dir.cleanup()
            self._dir, self._file = None, None
        self.records = 0


class TokenCounts:
    """How often each token id occurs among the pass's kept tokens (grown to the largest id seen)."""

    def __init__(self) -> None:
        self.counts = torch.zeros(0, dtype=torch.long)

    def add(self, ids: Tensor) -> None:
        ids = ids.long().cpu()
        if ids.numel() == 0:
            return
        self.grow(int(ids.max()) + 1)
        self.counts += torch.bincount(ids, minlength=self.counts.numel())

    def grow(self, size: int) -> None:
        if size > self.counts.numel():
            self.counts = torch.cat([self.counts, torch.zeros(size - self.counts.numel(), dtype=torch.long)])

    def merge(self, other: TokenCounts) -> None:
        self.grow(other.counts.numel())
        self.counts[: other.counts.numel()] += other.counts


def slot_blocks(firings: Tensor, budget: int) -> list[tuple[int, int]]:
    """Contiguous ranges [lo, hi) of slots whose firings add up to about `budget` (a range holds slots whose
    firings before them fall in one multiple of the budget, so one busy slot may exceed it alone)."""
    before = firings.cumsum(0) - firings  # (slots,)
    block = torch.div(before, max(budget, 1), rounding_mode="floor")
    starts = [0] + (torch.nonzero(block[1:] != block[:-1]).flatten() + 1).tolist()
    return list(zip(starts, [*starts[1:], firings.numel()], strict=True))


def aggregate(spill: FiringSpill, lo: int, hi: int, vocab: int,
              chunk: int = CHUNK_RECORDS) -> tuple[Tensor, Tensor, Tensor]:
    """Exact per-(slot, token) firing counts and mass of slots [lo, hi): key = (slot - lo) · vocab + token, sorted
    and unique, with count (int64) and mass (float64), aggregated chunk by chunk."""
    key = torch.zeros(0, dtype=torch.long)
    count, mass = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
    for slot, token, magnitude in spill.chunks(chunk):
        inside = (slot >= lo) & (slot < hi)
        if not bool(inside.any()):
            continue
        key, count, mass = combine([(key, count, mass), ((slot[inside] - lo) * vocab + token[inside],
                                                         torch.ones(int(inside.sum()), dtype=torch.long),
                                                         magnitude[inside].double())])
    return key, count, mass


def combine(parts: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """Sum (key, count, mass) aggregates over equal keys: sorted unique keys with their totals."""
    key = torch.cat([p[0] for p in parts])
    unique, inverse = torch.unique(key, sorted=True, return_inverse=True)
    count = torch.zeros(unique.numel(), dtype=torch.long).index_add_(0, inverse, torch.cat([p[1] for p in parts]))
    mass = torch.zeros(unique.numel(), dtype=torch.float64).index_add_(0, inverse, torch.cat([p[2] for p in parts]))
    return unique, count, mass


def label_block(key: Tensor, count: Tensor, mass: Tensor, slots: int, occurrences: Tensor,
                label_n: int) -> dict[str, Tensor]:
    """The labels of `slots` slots from their exact (key, count, mass) aggregates (`aggregate`); `occurrences`
    (V,) the pass's token histogram. Returns LABEL_KEYS as (slots, L) and (slots,) tensors."""
    vocab = occurrences.numel()
    slot, token = torch.div(key, vocab, rounding_mode="floor"), key % vocab
    firings = torch.zeros(slots, dtype=torch.long).index_add_(0, slot, count)  # (slots,)
    total_mass = torch.zeros(slots, dtype=torch.float64).index_add_(0, slot, mass)
    # Per slot by mass, descending; keys arrive sorted by (slot, token), so equal masses keep the smaller token first.
    order = torch.argsort(mass, descending=True, stable=True)
    order = order[torch.argsort(slot[order], stable=True)]
    rank = _rank_in_runs(slot[order])
    order, rank = order[rank < label_n], rank[rank < label_n]
    rows = slot[order]
    ids = torch.full((slots, label_n), -1, dtype=torch.long)
    on_token = torch.zeros((slots, label_n), dtype=torch.long)
    token_mass = torch.zeros((slots, label_n), dtype=torch.float64)
    seen = torch.zeros((slots, label_n), dtype=torch.long)
    ids[rows, rank], on_token[rows, rank], token_mass[rows, rank] = token[order], count[order], mass[order]
    seen[rows, rank] = occurrences[token[order]]
    hits, predicted = on_token.cumsum(1), seen.cumsum(1)  # (slots, L): firings on / occurrences of the prefix
    f1 = torch.where(ids >= 0, 2 * hits / (firings.unsqueeze(1) + predicted).clamp_min(1), -1.0)
    best = f1.argmax(1, keepdim=True)  # the first maximum: the shortest prefix that reaches it
    fired = firings > 0
    hit, pred = hits.gather(1, best).squeeze(1), predicted.gather(1, best).squeeze(1)
    return {
        "label_ids": ids, "label_share": (token_mass / total_mass.clamp_min(1e-300).unsqueeze(1)).float(),
        "label_firings": on_token, "label_occurrences": seen,
        "label_size": torch.where(fired, best.squeeze(1) + 1, 0),
        "label_precision": torch.where(fired, hit / pred.clamp_min(1), 0.0).float(),
        "label_recall": torch.where(fired, hit / firings.clamp_min(1), 0.0).float(),
        "label_f1": torch.where(fired, f1.gather(1, best).squeeze(1), 0.0).float(),
    }


def compute_labels(spill: FiringSpill, tokens: TokenCounts, firings: Tensor, label_n: int,
                   parallel: Distributed = LOCAL, block_firings: int = BLOCK_FIRINGS,
                   chunk: int = CHUNK_RECORDS) -> dict[str, Tensor] | None:
    """Every slot's label (LABEL_KEYS, (slots, L) / (slots,)) from this rank's spill and token histogram and
    `firings` (slots,) this rank's firing counts per slot; collective under torchrun, the result on rank 0 only."""
    if parallel.world > 1:
        gathered = parallel.gather_objects((tokens.counts, firings.cpu()))
        merged = TokenCounts()
        for counts, _ in gathered:
            merged.merge(_wrap(counts))
        tokens, firings = merged, torch.stack([f for _, f in gathered]).sum(0)
    tokens.grow(1)  # a pass without tokens still has a (zero) histogram
    occurrences, firings = tokens.counts, firings.cpu()
    vocab = max(occurrences.numel(), 1)
    out = {k: [] for k in LABEL_KEYS}
    for lo, hi in slot_blocks(firings, block_firings):
        part = aggregate(spill, lo, hi, vocab, chunk)
        if parallel.world > 1:
            parts = parallel.gather_objects(part)
            if not parallel.is_main:
                continue
            part = combine(list(parts))
        for k, v in label_block(*part, hi - lo, occurrences, label_n).items():
            out[k].append(v)
    if not parallel.is_main:
        return None
    return {k: torch.cat(v) for k, v in out.items()}


def _wrap(counts: Tensor) -> TokenCounts:
    wrapped = TokenCounts()
    wrapped.counts = counts.long().cpu()
    return wrapped
