"""Per-feature dashboard statistics of one stage, accumulated batch by batch with memory bounded in the number of
tokens: firing counts, sums, maxima and log-binned histograms per side, the top-n examples with their context
windows, and hash-priority reservoirs per histogram bin from which the quantile examples are drawn at the end.

Everything here is a sum, a maximum, a fixed-edge histogram or a selection under a total order (value, then
document, then position; a reservoir keeps the entries of smallest hash(document, position)), so accumulators
of disjoint document slices `merge` into exactly what one pass over all of them gives, whatever the order.
Never materialises more than one batch's (tokens × d_sae) codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

EMPTY_HASH = 2**62  # larger than any hash: an empty reservoir slot
_HASH_BITS = 40


@dataclass(frozen=True)
class DashboardSettings:
    """What the pass keeps per feature (the record's integers) and the shared histogram range."""

    top_n: int = 20
    context: int = 10
    bins: int = 36
    bin_min: float = 1e-3
    bin_max: float = 1e3
    quantiles: int = 5
    per_quantile: int = 4
    logit_n: int = 10
    neighbours: int = 10
    label_n: int = 8  # tokens a feature's label may hold (trainer/dashboards/labels.py); 0: no labels
    cooccurrence: int = 10
    cooccurrence_max_width: int = 8192  # wider stages skip co-occurrence (an H × H count matrix)
    seed: int = 0

    def edges(self) -> Tensor:
        return torch.logspace(math.log10(self.bin_min), math.log10(self.bin_max), self.bins + 1)  # (B + 1,)


@dataclass
class BatchTokens:
    """Where one batch's kept tokens sit: the (R, T) grid of token ids, and per kept token its grid cell,
    document and position, plus the grid -> kept-token map used to read windows (-1: not a kept token)."""

    grid_ids: Tensor  # (R, T) int64 token ids
    cell: Tensor  # (N,) int64 index into the flattened grid
    doc: Tensor  # (N,) int64
    pos: Tensor  # (N,) int64
    kept_index: Tensor  # (R * T,) int64

    @property
    def width(self) -> int:
        return self.grid_ids.shape[1]

    @property
    def ids(self) -> Tensor:
        """The token id of every kept token (N,)."""
        return self.grid_ids.reshape(-1)[self.cell]


def token_hash(doc: Tensor, pos: Tensor, seed: int) -> Tensor:
    """A deterministic 40-bit hash of (document, position): the reservoirs' priority (splitmix64 finaliser)."""
    x = (doc.long() << 24) ^ pos.long() ^ (seed * 0x9E3779B97F4A7C15 & 0x7FFFFFFFFFFFFFFF)
    x = (x ^ (x >> 30)) * -0x40A7B892E31B1A47  # 0xBF58476D1CE4E5B9 as a signed int64 (wrapping multiply)
    x = (x ^ (x >> 27)) * -0x6B2FB644ECCEEE15  # 0x94D049BB133111EB
    x = x ^ (x >> 31)
    return x & ((1 << _HASH_BITS) - 1)


def windows(tokens: BatchTokens, rows: Tensor, codes: Tensor, features: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """Token ids and the feature's signed value in the window around kept tokens `rows` (..., ) of features
    `features` (same shape): (..., W) each; -1 ids and 0 values outside the window's row or on non-kept tokens."""
    offsets = torch.arange(-context, context + 1, device=rows.device)  # (W,)
    cell = tokens.cell[rows.clamp_min(0)]  # (...)
    col = (cell % tokens.width).unsqueeze(-1) + offsets  # (..., W)
    inside = (col >= 0) & (col < tokens.width) & (rows >= 0).unsqueeze(-1)
    grid = (cell - cell % tokens.width).unsqueeze(-1) + col.clamp(0, tokens.width - 1)  # (..., W)
    kept = torch.where(inside, tokens.kept_index[grid], -1)  # (..., W)
    valid = kept >= 0
    ids = torch.where(valid, tokens.grid_ids.reshape(-1)[grid], -1).int()
    values = codes[kept.clamp_min(0), features.unsqueeze(-1).expand_as(kept)]  # (..., W)
    return ids, torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device)).float()


def _order(value: Tensor, doc: Tensor, pos: Tensor, keep: int) -> Tensor:
    """Indices along the last dim of the `keep` best entries: larger value, then smaller doc, then smaller pos."""
    order = torch.argsort(pos, dim=-1, stable=True)
    order = order.gather(-1, torch.argsort(doc.gather(-1, order), dim=-1, stable=True))
    order = order.gather(-1, torch.argsort(value.gather(-1, order), dim=-1, descending=True, stable=True))
    return order[..., :keep]


@dataclass
class Examples:
    """A set of examples per slot group: value (..., k), doc, pos, and their windows (..., k, W)."""

    value: Tensor
    doc: Tensor
    pos: Tensor
    tokens: Tensor
    acts: Tensor
    priority: Tensor  # (..., k) int64: the hash for reservoirs (smaller first), unused (0) for the top examples

    @classmethod
    def empty(cls, shape: tuple[int, ...], window: int, device: torch.device) -> Examples:
        return cls(torch.zeros(shape, device=device), torch.full(shape, -1, dtype=torch.long, device=device),
                   torch.full(shape, -1, dtype=torch.long, device=device),
                   torch.full((*shape, window), -1, dtype=torch.int32, device=device),
                   torch.zeros((*shape, window), device=device),
                   torch.full(shape, EMPTY_HASH, dtype=torch.long, device=device))

    def cat(self, other: Examples) -> Examples:
        return Examples(*(torch.cat([getattr(self, f.name), getattr(other, f.name)], dim=len(self.value.shape) - 1)
                          for f in fields(self)))

    def take_rows(self, rows: Tensor) -> Examples:
        return Examples(*(getattr(self, f.name)[rows] for f in fields(self)))

    def put_rows(self, rows: Tensor, values: Examples) -> None:
        for f in fields(self):
            getattr(self, f.name)[rows] = getattr(values, f.name)

    def take(self, index: Tensor) -> Examples:
        """Entries `index` (..., k') along the slot dimension."""
        def pick(x: Tensor) -> Tensor:
            i = index if x.dim() == index.dim() else index.unsqueeze(-1).expand(*index.shape, x.shape[-1])
            return x.gather(index.dim() - 1, i)
        return Examples(*(pick(getattr(self, f.name)) for f in fields(self)))


class SideAccumulator:
    """The statistics of one side (|z| of z > 0, or of z < 0) of every feature of one stage.

    Windows are gathered only for the entries that survive a merge (the few that enter a top list or a
    reservoir), and a batch touches only the reservoirs of the (feature, bin) groups it fired in."""

    def __init__(self, d_sae: int, settings: DashboardSettings, device: torch.device) -> None:
        self.settings, self.d_sae, self.device = settings, d_sae, device
        h, b, window = d_sae, settings.bins, 2 * settings.context + 1
        self.count = torch.zeros(h, dtype=torch.long, device=device)
        self.sum = torch.zeros(h, dtype=torch.float64, device=device)
        self.max = torch.zeros(h, device=device)
        self.hist = torch.zeros(h, b, dtype=torch.long, device=device)
        self.top = Examples.empty((h, settings.top_n), window, device)
        self.reservoir = Examples.empty((h * b, settings.per_quantile), window, device)  # group = feature·B + bin
        self._log_min = math.log10(settings.bin_min)
        self._log_step = (math.log10(settings.bin_max) - self._log_min) / b

    def bin_of(self, magnitude: Tensor) -> Tensor:
        return ((magnitude.log10() - self._log_min) / self._log_step).floor().long().clamp(0, self.settings.bins - 1)

    def update(self, magnitude: Tensor, codes: Tensor, tokens: BatchTokens) -> tuple[Tensor, Tensor, Tensor]:
        """Add one batch: `magnitude` (N, H) >= 0 is this side's |z| (0 where it did not fire), `codes` (N, H)
        the signed codes the windows show. Returns the firings: row, feature, |z| (nnz,) each."""
        fired = magnitude > 0  # (N, H)
        self.count += fired.sum(0)
        self.sum += magnitude.sum(0, dtype=torch.float64)
        self.max = torch.maximum(self.max, magnitude.max(0).values)
        row, feature = fired.nonzero(as_tuple=True)  # (nnz,)
        value = magnitude[row, feature]
        bins = self.bin_of(value)
        self.hist.view(-1).index_add_(0, feature * self.settings.bins + bins, torch.ones_like(feature))
        self._update_top(magnitude, codes, tokens)
        self._update_reservoir(row, feature, value, bins, codes, tokens)
        return row, feature, value

    def _update_top(self, magnitude: Tensor, codes: Tensor, tokens: BatchTokens) -> None:
        n = self.settings.top_n
        value, row = _batch_top(magnitude, min(n, magnitude.shape[0]))  # (H, k)
        row = torch.where(value > 0, row, -1)
        doc = torch.where(row >= 0, tokens.doc[row.clamp_min(0)], -1)
        pos = torch.where(row >= 0, tokens.pos[row.clamp_min(0)], -1)
        keep = _order(torch.cat([self.top.value, value.float()], 1), torch.cat([self.top.doc, doc], 1),
                      torch.cat([self.top.pos, pos], 1), n)  # (H, n) into [old n | new k]
        if not bool((keep >= n).any()):
            return
        merged = self.top.cat(_placeholders(value.float(), doc, pos, self.top.tokens.shape[-1]))
        self.top = merged.take(keep)
        feature, slot = (keep >= n).nonzero(as_tuple=True)  # the new entries that made it
        rows = row[feature, keep[feature, slot] - n]
        self.top.tokens[feature, slot], self.top.acts[feature, slot] = windows(tokens, rows, codes, feature,
                                                                              self.settings.context)

    def _update_reservoir(self, row: Tensor, feature: Tensor, value: Tensor, bins: Tensor, codes: Tensor,
                          tokens: BatchTokens) -> None:
        """Keep, per (feature, bin), the `per_quantile` firings of smallest hash(doc, pos) seen so far."""
        m = self.settings.per_quantile
        if row.numel() == 0:
            return
        doc, pos = tokens.doc[row], tokens.pos[row]
        priority = token_hash(doc, pos, self.settings.seed)
        group = feature * self.settings.bins + bins  # (nnz,)
        order = torch.argsort((group << _HASH_BITS) | priority)  # by group, then hash
        rank = _rank_in_runs(group[order])
        order = order[rank < m]
        touched, local = torch.unique(group[order], return_inverse=True)  # (G',), (c,)
        slot = _rank_in_runs(local)
        fresh_priority = torch.full((touched.numel(), m), EMPTY_HASH, dtype=torch.long, device=self.device)
        fresh_priority[local, slot] = priority[order]
        both = torch.cat([self.reservoir.priority[touched], fresh_priority], 1)  # (G', 2m)
        keep = torch.argsort(both, dim=1, stable=True)[:, :m]
        if not bool((keep >= m).any()):
            return
        old = self.reservoir.take_rows(touched)
        fresh = _placeholders(torch.zeros_like(fresh_priority, dtype=torch.float), torch.full_like(fresh_priority, -1),
                              torch.full_like(fresh_priority, -1), old.tokens.shape[-1])
        fresh.priority = fresh_priority
        fresh.value[local, slot], fresh.doc[local, slot], fresh.pos[local, slot] = value[order].float(), doc[order], \
            pos[order]
        updated = old.cat(fresh).take(keep)
        new_group, new_slot = (keep >= m).nonzero(as_tuple=True)
        entry = torch.full((touched.numel(), m), -1, dtype=torch.long, device=self.device)
        entry[local, slot] = order
        source = entry[new_group, keep[new_group, new_slot] - m]  # index into the batch's firings
        updated.tokens[new_group, new_slot], updated.acts[new_group, new_slot] = windows(
            tokens, row[source], codes, feature[source], self.settings.context)
        self.reservoir.put_rows(touched, updated)

    def merge(self, other: SideAccumulator) -> None:
        """Fold in the accumulator of another slice of the documents (the result does not depend on the order)."""
        self.count += other.count
        self.sum += other.sum
        self.max = torch.maximum(self.max, other.max)
        self.hist += other.hist
        merged = self.top.cat(other.top)
        self.top = merged.take(_order(merged.value, merged.doc, merged.pos, self.settings.top_n))
        merged = self.reservoir.cat(other.reservoir)
        keep = torch.argsort(merged.priority, dim=-1, stable=True)[..., : self.settings.per_quantile]
        self.reservoir = merged.take(keep)

    def state(self) -> dict[str, Tensor]:
        """Every tensor, by name (for all-gathering across ranks)."""
        out = {"count": self.count, "sum": self.sum, "max": self.max, "hist": self.hist}
        for prefix, examples in (("top", self.top), ("reservoir", self.reservoir)):
            out |= {f"{prefix}.{f.name}": getattr(examples, f.name) for f in fields(examples)}
        return out

    def load_state(self, state: dict[str, Tensor]) -> None:
        self.count, self.sum, self.max, self.hist = state["count"], state["sum"], state["max"], state["hist"]
        self.top = Examples(*(state[f"top.{f.name}"] for f in fields(Examples)))
        self.reservoir = Examples(*(state[f"reservoir.{f.name}"] for f in fields(Examples)))


def _batch_top(magnitude: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per feature, the k largest values of a batch (N, H) and their rows, (H, k) each; among equal values the
    earlier rows (earlier documents and positions) win, as in the total order, which topk alone does not promise.
    Features with a tie across the k-th value are re-sorted stably (rare outside synthetic data)."""
    value, row = magnitude.topk(k, dim=0)  # (k, H)
    kth = value[-1]
    ambiguous = (kth > 0) & ((magnitude == kth).sum(0) > (value == kth).sum(0))  # (H,)
    if bool(ambiguous.any()):
        cols = ambiguous.nonzero(as_tuple=True)[0]
        ordered, rows = magnitude[:, cols].sort(dim=0, descending=True, stable=True)
        value[:, cols], row[:, cols] = ordered[:k], rows[:k]
    return value.T.contiguous(), row.T.contiguous()


def _rank_in_runs(keys: Tensor) -> Tensor:
    """For a sorted 1-d tensor, each element's index within its run of equal keys."""
    index = torch.arange(keys.numel(), device=keys.device)
    first = torch.ones_like(keys, dtype=torch.bool)
    first[1:] = keys[1:] != keys[:-1]
    return index - torch.cummax(torch.where(first, index, 0), 0).values


def _placeholders(value: Tensor, doc: Tensor, pos: Tensor, window: int) -> Examples:
    """Examples whose windows are not gathered yet (filled for the survivors only)."""
    return Examples(value, doc, pos, torch.full((*value.shape, window), -1, dtype=torch.int32, device=value.device),
                    torch.zeros((*value.shape, window), device=value.device), torch.zeros_like(doc))
