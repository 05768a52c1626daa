"""One feature's dashboard as GetFeature returns it, read from the stage's stored dashboard tensors
(core/stack/dashboards.py describes them) with each side's token label, plus its explanation and meta-latents.

The tensors are on the CPU and indexed per feature here, so a GetFeature costs a few hundred small reads and one
batched decode of the examples' tokens, whatever the stage's width. Empty slots (document -1, ids -1) are
dropped: a window near a document's start has fewer tokens, and the firing token's index moves with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.host.host_model import HostModel
from core.stack.dashboards import TokenLabel, feature_labels
from core.stack.explanations import read_records
from core.stack.meta_sae import meta_latents
from core.stack.reader import LoadedStack, LoadedStage
from service.engine.contract.feature_specs import (
    CoOccurrence,
    DashboardSide,
    Example,
    ExampleToken,
    FeatureDashboard,
    LabelToken,
    MetaLatents,
    Neighbour,
    QuantileGroup,
    SideLabel,
    Sign,
)
from service.engine.operations.decompose import token_texts

SIDES = (Sign.POSITIVE, Sign.NEGATIVE)


def dashboard_tokens(stage: LoadedStage) -> int:
    """Tokens the stage's dashboard pass read (0 when unknown)."""
    value = stage.dashboard_record.get("tokens")
    return value if type(value) is int and value > 0 else 0


def densities(stage: LoadedStage) -> Tensor:
    """Every feature's firing density over both sides, (H,) float64; the stage must have a dashboard."""
    assert stage.dashboard is not None
    return stage.dashboard["count"].sum(0).double() / max(dashboard_tokens(stage), 1)  # (H,)


class _Examples:
    """Collects example windows, then decodes every distinct token id of them in one batch."""

    def __init__(self, context: int) -> None:
        self.context = context
        self.pending: list[tuple[list[int], list[float], int, float, int, int]] = []

    def add(self, ids: Tensor, acts: Tensor, value: float, document: int, position: int) -> int:
        """ids/acts: (W,) of one window; returns the example's number."""
        id_list, act_list = ids.tolist(), acts.tolist()
        keep = [j for j, i in enumerate(id_list) if i >= 0]
        index = sum(1 for j in keep if j < self.context)
        self.pending.append(([id_list[j] for j in keep], [act_list[j] for j in keep], index, value, document,
                             position))
        return len(self.pending) - 1

    def build(self, tokenizer) -> list[Example]:
        distinct = sorted({i for ids, *_ in self.pending for i in ids})
        texts = dict(zip(distinct, token_texts(tokenizer, distinct), strict=True)) if distinct else {}
        return [Example(tuple(ExampleToken(i, texts[i], v) for i, v in zip(ids, acts, strict=True)),
                        min(index, max(len(ids) - 1, 0)), value, document, position)
                for ids, acts, index, value, document, position in self.pending]


def _add_group(examples: _Examples, d: dict[str, Tensor], group: str, at: tuple[int, ...], sign: float) -> list[int]:
    """Numbers of the non-empty examples of `group` ("top" or "quantile") at index `at` (side, feature[, q])."""
    docs = d[f"{group}_doc"][at]  # (n,)
    values, positions = d[f"{group}_value"][at], d[f"{group}_pos"][at]
    tokens, acts = d[f"{group}_tokens"][at], d[f"{group}_acts"][at]  # (n, W)
    return [examples.add(tokens[j], acts[j], sign * float(values[j]), int(docs[j]), int(positions[j]))
            for j in range(docs.shape[0]) if int(docs[j]) >= 0]


def _histogram(edges: Tensor, counts: Tensor) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Edges (B + 1,) and counts (B,) trimmed to the first..last non-empty bin (both empty without firings)."""
    filled = counts.nonzero().flatten()
    if filled.numel() == 0:
        return (), ()
    lo, hi = int(filled[0]), int(filled[-1])
    return tuple(edges[lo : hi + 2].tolist()), tuple(int(c) for c in counts[lo : hi + 1].tolist())


def _neighbours(stages: Tensor | None, ids: Tensor, cos: Tensor, own: int) -> tuple[Neighbour, ...]:
    """Rows (K,) of one feature; -1 marks an empty slot."""
    stage_list = [own] * ids.shape[0] if stages is None else stages.tolist()
    return tuple(Neighbour(int(s), int(i), float(c)) for s, i, c in zip(stage_list, ids.tolist(), cos.tolist(),
                                                                       strict=True) if i >= 0 and s >= 0)


def side_labels(tokenizer, labels: Sequence[TokenLabel]) -> dict[int, SideLabel]:
    """{side index (0 positive, 1 negative): its label with the tokens decoded}, one decode for every side."""
    distinct = sorted({t for label in labels for t in label.token_ids})
    texts = dict(zip(distinct, token_texts(tokenizer, distinct), strict=True)) if distinct else {}
    return {0 if label.sign > 0 else 1: SideLabel(
        tuple(LabelToken(t, texts[t], float(share), int(n), int(seen)) for t, share, n, seen in
              zip(label.token_ids, label.shares, label.firings, label.occurrences, strict=True)),
        label.size, label.precision, label.recall, label.f1) for label in labels}


def feature_dashboard(host: HostModel, stage: LoadedStage, feature: int) -> FeatureDashboard | None:
    """The stored dashboard of one feature, or None when the stage has none."""
    d = stage.dashboard
    if d is None:
        return None
    record, tokens = stage.dashboard_record, dashboard_tokens(stage)
    context = (d["top_tokens"].shape[-1] - 1) // 2
    examples = _Examples(context)
    sides = []
    for s in range(d["count"].shape[0]):
        sign = -1.0 if s == 1 else 1.0
        top = _add_group(examples, d, "top", (s, feature), sign)
        groups = [(q, _add_group(examples, d, "quantile", (s, feature, q), sign))
                  for q in range(d["quantile_share"].shape[-1]) if float(d["quantile_share"][s, feature, q]) > 0]
        sides.append((s, top, groups))
    built = examples.build(host.tokenizer)
    labels = side_labels(host.tokenizer, feature_labels(d, feature))
    out = []
    for s, top, groups in sides:
        count, total = int(d["count"][s, feature]), float(d["sum"][s, feature])
        edges, counts = _histogram(d["bin_edges"], d["hist"][s, feature])
        low, high, share = (d[f"quantile_{k}"][s, feature] for k in ("low", "high", "share"))  # (Q,) each
        quantiles = tuple(QuantileGroup(float(low[q]), float(high[q]), float(share[q]),
                                        tuple(built[n] for n in numbers)) for q, numbers in groups)
        out.append(DashboardSide(SIDES[s], count, count / tokens if tokens else 0.0, total / count if count else 0.0,
                                 float(d["max"][s, feature]), edges, counts, tuple(built[n] for n in top), quantiles,
                                 labels.get(s)))
    cooccur = tuple(CoOccurrence(int(i), float(j)) for i, j in zip(d["cooccur_ids"][feature].tolist(),
                                                                   d["cooccur_jaccard"][feature].tolist(), strict=True)
                    if i >= 0)
    documents = record.get("documents")
    return FeatureDashboard(
        tokens=tokens, documents=documents if type(documents) is int and documents >= 0 else 0,
        corpus=str(record.get("corpus", "")), context=context, sides=tuple(out),
        neighbours=_neighbours(None, d["neighbour_ids"][feature], d["neighbour_cos"][feature], stage.index),
        cross_stage=_neighbours(d["cross_stage"][feature], d["cross_ids"][feature], d["cross_cos"][feature], -1),
        cooccurring=cooccur)


def summary_examples(host: HostModel, dashboard: FeatureDashboard) -> tuple[tuple[str, int, float], ...]:
    """GetFeatureResponse.top_examples from a dashboard: every side's top examples, largest |value| first, as
    (decoded window, index of the firing token, value)."""
    examples: Sequence[Example] = sorted((x for side in dashboard.sides for x in side.top_examples),
                                         key=lambda x: -abs(x.value))
    return tuple((host.decode([t.id for t in x.tokens], skip_special_tokens=False), x.index, x.value)
                 for x in examples)


def explanation(stack: LoadedStack, stage: LoadedStage, feature: int) -> str:
    return stack.explanations.get(stage.name, {}).get(feature, "")


_RECORDS: dict[tuple[str, str], dict[str, dict[int, Any]]] = {}
"""(stack path, digest) -> the explanations file's entries (core/stack/explanations.py), read on first use."""


def explanation_source(path: Path, digest: str, stack: LoadedStack, stage: LoadedStage, feature: int) -> dict | None:
    """The feature's scored explanation record (`featurewire-train explain`), or None for an imported text or
    none at all."""
    if not stack.explanations.get(stage.name, {}).get(feature):
        return None
    key = (str(path), digest)
    if key not in _RECORDS:
        _RECORDS[key] = read_records(path)
    entry = _RECORDS[key].get(stage.name, {}).get(feature)
    return entry if isinstance(entry, dict) else None


@torch.inference_mode()
def feature_meta_latents(stage: LoadedStage, feature: int) -> MetaLatents | None:
    """The meta-SAE's code of the feature's unit decoder row; None when the stage has no meta-SAE."""
    if stage.meta_sae is None:
        return None
    ids, values = meta_latents(stage, feature)  # (n_active,) each
    return MetaLatents(tuple(int(i) for i in ids.tolist()), tuple(float(v) for v in values.tolist()),
                       int(stage.meta_sae.d_sae))
