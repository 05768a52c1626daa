"""One stage's dashboard: its side accumulators (two for a signed stage), the co-occurrence counts, the firings
kept for the token labels, and the conversion of what was accumulated into the stored tensors (quantile intervals
and their examples, the labels)."""

from __future__ import annotations

from dataclasses import fields

import torch
from torch import Tensor

from core.stack.dashboards import DashboardShape
from trainer.dashboards.accumulator import BatchTokens, DashboardSettings, Examples, SideAccumulator
from trainer.dashboards.labels import FiringSpill, TokenCounts, compute_labels
from trainer.training.distributed import LOCAL, Distributed

_GROUP_SHIFT = 41


class StageAccumulator:
    """Accumulates one stage's codes batch by batch; `tensors()` gives the dashboard file's content."""

    def __init__(self, d_sae: int, signed: bool, settings: DashboardSettings, device: torch.device) -> None:
        self.d_sae, self.signed, self.settings, self.device = d_sae, signed, settings, device
        self.sides = [SideAccumulator(d_sae, settings, device) for _ in range(2 if signed else 1)]
        self.track_cooccurrence = settings.cooccurrence > 0 and d_sae <= settings.cooccurrence_max_width
        self.cooccur = torch.zeros((d_sae, d_sae) if self.track_cooccurrence else (0, 0), dtype=torch.int32,
                                   device=device)
        self.spill, self.token_counts = FiringSpill(), TokenCounts()  # for the labels (slot = side · H + feature)
        self.labels: dict[str, Tensor] | None = None

    @property
    def shape(self) -> DashboardShape:
        s = self.settings
        return DashboardShape(d_sae=self.d_sae, signs=len(self.sides), top_n=s.top_n, context=s.context, bins=s.bins,
                              quantiles=s.quantiles, per_quantile=s.per_quantile, logit_n=s.logit_n,
                              neighbours=s.neighbours, cooccurrence=s.cooccurrence if self.track_cooccurrence else 0,
                              labels=s.label_n)

    def update(self, codes: Tensor, tokens: BatchTokens) -> None:
        """Add one batch of codes (N, H), signed for a signed stage."""
        codes = codes.float()
        ids = tokens.ids  # (N,)
        for i, side in enumerate(self.sides):
            row, feature, value = side.update((codes if i == 0 else -codes).clamp_min(0), codes, tokens)
            if self.settings.label_n:
                self.spill.add(i * self.d_sae + feature, ids[row], value)
        if self.settings.label_n:
            self.token_counts.add(ids)
        if self.track_cooccurrence:
            fired = (codes != 0).float()  # (N, H)
            self.cooccur += (fired.T @ fired).round().int()  # exact: per-batch counts are at most N < 2**24

    def merge(self, other: StageAccumulator) -> None:
        for mine, theirs in zip(self.sides, other.sides, strict=True):
            mine.merge(theirs)
        self.cooccur += other.cooccur
        if other.spill.records:  # (the accumulators of other ranks carry no firings: their labels are computed)
            if self.labels is not None:
                raise RuntimeError("merge the accumulators of document slices before their labels are computed")
            self.spill.extend(other.spill)
        self.token_counts.merge(other.token_counts)

    def finish_labels(self, parallel: Distributed = LOCAL) -> None:
        """Compute the labels from the kept firings (collective under torchrun: every rank calls it, rank 0 keeps
        them) and free the firings. Until then `state()` carries no labels."""
        if self.settings.label_n and self.labels is None:
            firings = torch.cat([side.count for side in self.sides])  # (S·H,)
            self.labels = compute_labels(self.spill, self.token_counts, firings, self.settings.label_n, parallel)
        self.spill.close()

    def state(self) -> dict[str, Tensor]:
        out = {f"side{i}.{k}": v for i, side in enumerate(self.sides) for k, v in side.state().items()}
        return out | {"cooccur": self.cooccur}

    def load_state(self, state: dict[str, Tensor]) -> None:
        for i, side in enumerate(self.sides):
            side.load_state({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"side{i}.")})
        self.cooccur = state["cooccur"]

    # ------------------------------------------------------------------------------------------- output

    def tensors(self) -> dict[str, Tensor]:
        """count, sum, max, bin_edges, hist, top_*, quantile_*, cooccur_* and label_* (core/stack/dashboards.py)."""
        out: dict[str, Tensor] = {
            "count": torch.stack([s.count for s in self.sides]), "sum": torch.stack([s.sum for s in self.sides]),
            "max": torch.stack([s.max for s in self.sides]), "bin_edges": self.settings.edges().float(),
            "hist": torch.stack([s.hist for s in self.sides]),
        }
        top = [s.top for s in self.sides]
        for f in fields(Examples):
            if f.name != "priority":
                out[f"top_{f.name}"] = torch.stack([getattr(e, f.name) for e in top])
        quantiles = [self._quantiles(s) for s in self.sides]
        for key in quantiles[0]:
            out[key] = torch.stack([q[key] for q in quantiles])
        out |= self._cooccurring()
        if self.settings.label_n:
            self.finish_labels()
            assert self.labels is not None
            out |= {k: v.reshape(len(self.sides), self.d_sae, *v.shape[1:]) for k, v in self.labels.items()}
        return {k: v.cpu().contiguous() for k, v in out.items()}

    def _quantiles(self, side: SideAccumulator) -> dict[str, Tensor]:
        """Q intervals of about equal firing mass, made of whole histogram bins, and m examples in each, drawn
        from the bins' reservoirs by smallest hash (so the choice is uniform and independent of batch order)."""
        q, m, b = self.settings.quantiles, self.settings.per_quantile, self.settings.bins
        h = self.d_sae
        hist = side.hist.double()  # (H, B)
        total = hist.sum(1, keepdim=True).clamp_min(1)
        before = hist.cumsum(1) - hist
        group = torch.where(side.hist > 0, (q * before / total).floor().long().clamp(max=q - 1), q)  # (H, B); q: none
        edges = self.settings.edges().to(self.device)
        member = group.unsqueeze(-1) == torch.arange(q, device=self.device)  # (H, B, Q)
        share = (hist.unsqueeze(-1) * member).sum(1) / total  # (H, Q)
        big = torch.tensor(float("inf"), device=self.device)
        low = torch.where(member, edges[:-1].view(1, b, 1), big).amin(1)  # (H, Q)
        high = torch.where(member, edges[1:].view(1, b, 1), -big).amax(1)
        high = torch.minimum(high, side.max.unsqueeze(1))
        empty = share == 0
        low, high = torch.where(empty, 0.0, low), torch.where(empty, 0.0, high)
        # Examples: every reservoir entry of a bin belongs to its bin's interval; keep m of smallest hash each.
        reservoir = Examples(*(getattr(side.reservoir, f.name).reshape(h, b, *getattr(side.reservoir, f.name).shape[1:])
                               for f in fields(Examples)))  # (H, B, m)
        entry_group = torch.where(reservoir.doc >= 0, group.unsqueeze(-1), q).reshape(h, b * m)
        key = (entry_group << _GROUP_SHIFT) | (reservoir.priority.reshape(h, b * m) & ((1 << _GROUP_SHIFT) - 1))
        order = torch.argsort(key, dim=1)  # (H, B·m): by interval, then hash
        sorted_group = entry_group.gather(1, order)
        first = torch.ones_like(sorted_group, dtype=torch.bool)
        first[:, 1:] = sorted_group[:, 1:] != sorted_group[:, :-1]
        index = torch.arange(b * m, device=self.device).expand(h, -1)
        rank = index - torch.cummax(torch.where(first, index, 0), 1).values
        use = (rank < m) & (sorted_group < q)
        rows, cols = use.nonzero(as_tuple=True)
        target = (sorted_group[rows, cols], rank[rows, cols])
        source = order[rows, cols]
        window = reservoir.tokens.shape[-1]
        chosen = Examples.empty((h, q, m), window, self.device)
        flat = Examples(*(getattr(reservoir, f.name).reshape(h, b * m, *getattr(reservoir, f.name).shape[3:])
                          for f in fields(Examples)))
        for f in fields(Examples):
            getattr(chosen, f.name)[rows, target[0], target[1]] = getattr(flat, f.name)[rows, source]
        # Within an interval, strongest first (as the top examples), for display.
        chosen = chosen.take(torch.argsort(chosen.value, dim=-1, descending=True, stable=True))
        out = {"quantile_low": low.float(), "quantile_high": high.float(), "quantile_share": share.float()}
        return out | {f"quantile_{f.name}": getattr(chosen, f.name) for f in fields(Examples) if f.name != "priority"}

    def _cooccurring(self) -> dict[str, Tensor]:
        """Per feature, the C features that fire on the same tokens most, by Jaccard index of their firing sets."""
        c = self.shape.cooccurrence
        if c == 0:
            empty = torch.zeros((self.d_sae, 0))
            return {"cooccur_ids": empty.long(), "cooccur_jaccard": empty}
        both = self.cooccur.double()  # (H, H)
        fired = both.diagonal()
        union = fired.unsqueeze(0) + fired.unsqueeze(1) - both
        jaccard = torch.where(union > 0, both / union.clamp_min(1), 0.0)
        jaccard.fill_diagonal_(-1.0)
        values, ids = jaccard.topk(min(c, self.d_sae), dim=1)  # (H, C)
        ids = torch.where(values > 0, ids, -1)
        values = values.clamp_min(0)
        if values.shape[1] < c:  # a stage narrower than C
            pad = c - values.shape[1]
            ids = torch.cat([ids, torch.full((self.d_sae, pad), -1, device=ids.device)], 1)
            values = torch.cat([values, torch.zeros((self.d_sae, pad), dtype=values.dtype, device=values.device)], 1)
        return {"cooccur_ids": ids.long(), "cooccur_jaccard": values.float()}
