"""SearchFeatures and ListFeatures on the engine worker: rank every candidate feature, then return one page.

- Text: one forward pass that stops after the last hookpoint the chosen stages need (with their residual
  sources'), the stack runtime's teacher-forced decomposition (ReSAE stages from what flowed, as Decompose does),
  and per feature the max or mean |z| over the ranked tokens. Features that never fired there are left out.
- Token: the logit lens read backwards, score_f = W_U[token] · W_dec[f] / s, one matrix-vector product per stage.
- Explanation: how many of the query's words each feature's explanation or token label (the words of its label's
  rule tokens, core/stack/dashboards.py) contains; equal counts rank by the better of the best label F1 over the
  sides and the explanation's detection score (balanced accuracy, when `featurewire-train explain` scored it), so
  the search works on every stack with labelled dashboards, explained or not.
- ListFeatures: the stage's dashboard counts, filtered by density and sorted (by density, max |z| or label F1).

Rankings are deterministic (ties broken by stage, then feature, ascending), so re-ranking for each page gives
the same order and a signed offset is all a page token needs to carry.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from core.host.host_model import HostModel
from core.stack.dashboards import feature_labels, stage_labels
from core.stack.reader import LoadedStage
from service.engine.contract.feature_specs import (
    ExplanationSearch,
    FeatureMatch,
    FeatureSort,
    FeatureSummary,
    ListPage,
    ListSpec,
    Page,
    Reduction,
    SearchPage,
    SearchSpec,
    Sign,
    TextSearch,
    TokenDirection,
    TokenSearch,
)
from service.engine.contract.search_validation import WORD, detection_scores
from service.engine.operations.dashboard import dashboard_tokens, densities
from service.engine.operations.decompose import needed_hookpoints, token_texts
from service.engine.stacks.served import ServedStack

_WORD_SETS: dict[tuple[str, str], dict[str, dict[int, frozenset[str]]]] = {}
"""(stack name, digest) -> stage name -> {feature: words of its explanation and its label's rule tokens}, built on
first search."""


def _window(page: Page, total: int) -> tuple[int, int, int | None]:
    """(start, stop, next offset or None) of the page within `total` ranked items."""
    start = min(page.offset, total)
    stop = min(start + page.size, total)
    return start, stop, stop if stop < total else None


def _ranked(scores: Tensor, descending: bool) -> Tensor:
    """Indices of `scores` (N,) in order; ties keep their input order (stage, then feature)."""
    return torch.sort(scores, descending=descending, stable=True).indices


class _Candidates:
    """Per-stage score vectors concatenated in stage order, with what each entry needs to become a match."""

    def __init__(self) -> None:
        self.scores: list[Tensor] = []
        self.stage: list[Tensor] = []
        self.feature: list[Tensor] = []
        self.position: list[Tensor] = []
        self.sign: list[Tensor] = []  # +1 / -1, or 0 for no sign
        self.keys: list[Tensor] = []  # what ranks them when it is not the score (explanation search)

    def add(self, stage: int, features: Tensor, scores: Tensor, position: Tensor | None = None,
            sign: Tensor | None = None, key: Tensor | None = None) -> None:
        n = features.shape[0]
        self.scores.append(scores.float().cpu())
        self.keys.append(self.scores[-1].double() if key is None else key.double().cpu())
        self.stage.append(torch.full((n,), stage, dtype=torch.long))
        self.feature.append(features.long().cpu())
        self.position.append(torch.zeros(n, dtype=torch.long) if position is None else position.long().cpu())
        self.sign.append(torch.zeros(n, dtype=torch.long) if sign is None else sign.long().cpu())

    def page(self, host: HostModel, stack: ServedStack, page: Page,
             descending: bool) -> tuple[tuple[FeatureMatch, ...], int, int | None]:
        if not self.scores:
            return (), 0, None
        scores = torch.cat(self.scores)  # (N,)
        order = _ranked(torch.cat(self.keys), descending)
        start, stop, following = _window(page, scores.shape[0])
        chosen = order[start:stop]
        stage, feature = torch.cat(self.stage)[chosen].tolist(), torch.cat(self.feature)[chosen].tolist()
        position, sign = torch.cat(self.position)[chosen].tolist(), torch.cat(self.sign)[chosen].tolist()
        tables = {i: densities(stack.loaded.stages[i]) for i in set(stage)
                  if stack.loaded.stages[i].dashboard is not None}
        matches = tuple(_match(host, stack, tables.get(s), s, f, float(v), p, g) for s, f, v, p, g in
                        zip(stage, feature, scores[chosen].tolist(), position, sign, strict=True))
        return matches, scores.shape[0], following


def best_label_f1(stage: LoadedStage) -> Tensor | None:
    """Every feature's best token-label F1 over its sides, (H,) float32; None without labels."""
    d = stage.dashboard
    return None if d is None or "label_f1" not in d else d["label_f1"].max(0).values


def label_line(host: HostModel, stage: LoadedStage, feature: int) -> str:
    """The feature's labels in one line, one `TokenLabel.describe` per side it fired on ("" without labels)."""
    labels = feature_labels(stage.dashboard, feature)
    return "; ".join(label.describe(lambda t: token_texts(host.tokenizer, [t])[0]) for label in labels)


def _match(host: HostModel, stack: ServedStack, density: Tensor | None, stage: int, feature: int, score: float,
           position: int, sign: int) -> FeatureMatch:
    """density: the stage's (H,) densities, or None without a dashboard."""
    loaded = stack.loaded.stages[stage]
    f1 = best_label_f1(loaded)
    return FeatureMatch(stage=stage, feature=feature, score=score,
                        sign=None if sign == 0 else (Sign.POSITIVE if sign > 0 else Sign.NEGATIVE),
                        position=position, density=None if density is None else float(density[feature]),
                        explanation=stack.loaded.explanations.get(loaded.name, {}).get(feature, ""),
                        label_f1=None if f1 is None else float(f1[feature]), label=label_line(host, loaded, feature))


@torch.inference_mode()
def _text_candidates(host: HostModel, stack: ServedStack, stages: Sequence[int], query: TextSearch) -> _Candidates:
    runtime = stack.runtime
    reads = needed_hookpoints(stack, stages)
    input_ids = torch.tensor([list(query.token_ids)], dtype=torch.int64)  # (1, T)
    captures = host.forward(input_ids, reads=reads, logits=False).captures
    results = runtime.decompose({hp: captures[hp][0] for hp in reads}, stages)  # codes (T, H) per stage
    rows = torch.tensor(query.ranked, dtype=torch.long)  # (R,)
    out = _Candidates()
    for i in stages:
        z = results[i].codes[rows.to(results[i].codes.device)].float()  # (R, H)
        magnitude = z.abs()
        peak, at = magnitude.max(dim=0)  # (H,) each
        score = peak if query.reduction is Reduction.MAX else magnitude.mean(dim=0)
        fired = (score > 0).nonzero().flatten()  # (F,)
        sign = None
        if runtime.stages[i].sae.signed:
            signed = z.gather(0, at[None])[0] if query.reduction is Reduction.MAX else z.sum(dim=0)  # (H,)
            sign = torch.where(signed[fired] < 0, -1, 1)
        out.add(i, fired, score[fired], rows[at[fired].cpu()], sign)
    return out


@torch.inference_mode()
def _token_candidates(host: HostModel, stack: ServedStack, stages: Sequence[int], query: TokenSearch) -> _Candidates:
    unembedding = host.model.get_output_embeddings().weight  # (V, d)
    row = unembedding[query.token_id].float()  # (d,)
    out = _Candidates()
    for i in stages:
        stage = stack.runtime.stages[i]
        w_dec = stage.sae.W_dec.float()  # (H, d)
        scores = (w_dec @ row.to(w_dec.device)) / stage.input_scale  # (H,)
        out.add(i, torch.arange(scores.shape[0]), scores)
    return out


def _words(text: str) -> frozenset[str]:
    return frozenset(WORD.findall(text.lower()))


def _stage_words(host: HostModel, stack: ServedStack, stage: LoadedStage) -> dict[int, frozenset[str]]:
    """{feature: words of its explanation and of its labels' rule tokens} for one stage."""
    labels = stage_labels(stage.dashboard)
    distinct = sorted({t for table in labels.values() for label in table for t in label.rule_ids})
    texts = dict(zip(distinct, token_texts(host.tokenizer, distinct), strict=True)) if distinct else {}
    out = {f: _words(" ".join(texts[t] for label in table for t in label.rule_ids)) for f, table in labels.items()}
    for f, text in stack.loaded.explanations.get(stage.name, {}).items():
        out[f] = out.get(f, frozenset()) | _words(text)
    return {f: words for f, words in sorted(out.items()) if words}


def _word_sets(host: HostModel, stack: ServedStack) -> dict[str, dict[int, frozenset[str]]]:
    key = (stack.name, stack.digest)
    if key not in _WORD_SETS:
        _WORD_SETS[key] = {stage.name: _stage_words(host, stack, stage) for stage in stack.loaded.stages}
    return _WORD_SETS[key]


def _explanation_candidates(host: HostModel, stack: ServedStack, stages: Sequence[int],
                            query: ExplanationSearch) -> _Candidates:
    tables, words = _word_sets(host, stack), set(query.words)
    out = _Candidates()
    for i in stages:
        hits = [(f, len(words & found)) for f, found in tables.get(stack.loaded.stages[i].name, {}).items()]
        hits = [(f, n) for f, n in hits if n]
        if hits:
            features = torch.tensor([f for f, _ in hits])  # (M,)
            counts = torch.tensor([float(n) for _, n in hits], dtype=torch.float64)  # (M,)
            f1 = best_label_f1(stack.loaded.stages[i])
            quality = torch.zeros_like(counts) if f1 is None else f1[features].double()  # (M,) in [0, 1]
            scored = detection_scores(stack).get(stack.loaded.stages[i].name, {})
            detection = torch.tensor([scored.get(f, 0.0) for f, _ in hits], dtype=torch.float64)  # (M,)
            quality = torch.maximum(quality, detection)
            out.add(i, features, counts, key=2 * counts + quality)  # by words matched, then by quality
    return out


def search_features(host: HostModel, stack: ServedStack, spec: SearchSpec) -> SearchPage:
    """One page of the ranked matches of the spec's query over its stages."""
    query, tokens = spec.query, ()
    if isinstance(query, TextSearch):
        candidates = _text_candidates(host, stack, spec.stages, query)
        ids = list(query.token_ids)
        tokens = tuple(zip(ids, token_texts(host.tokenizer, ids), strict=True))
        descending = True
    elif isinstance(query, TokenSearch):
        candidates = _token_candidates(host, stack, spec.stages, query)
        descending = query.direction is TokenDirection.PROMOTES
    else:
        candidates = _explanation_candidates(host, stack, spec.stages, query)
        descending = True
    matches, total, following = candidates.page(host, stack, spec.page, descending)
    return SearchPage(stack.name, matches, total, following, tokens)


def feature_table(stage: LoadedStage) -> tuple[Tensor, Tensor, Tensor]:
    """(density float64, max |z|, mean |z|), each (H,), over both sides of the stage's dashboard."""
    d = stage.dashboard
    assert d is not None
    count, total = d["count"].sum(0), d["sum"].sum(0)  # (H,) each
    mean = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))  # (H,)
    return densities(stage), d["max"].max(0).values, mean


def steering_key(record: dict, sort: FeatureSort, bound: float) -> float:
    """OUTPUT_SCORE: the output score; STEERING: the largest lift among points within the fluency-cost bound."""
    if sort is FeatureSort.OUTPUT_SCORE:
        return float(record.get("output_score") or 0.0)
    return max((p.get("lift", 0.0) for p in record["curve"] if p["fluency_cost"] <= bound), default=0.0)


def steering_summary(record: dict | None) -> tuple[bool | None, float | None, str]:
    """(steers, output score, best strength "op:unit:value") of a stored record; (None, None, "") without one."""
    if record is None:
        return None, None, ""
    best = record["verdict"].get("best")
    strength = "" if best is None else f"{best['op']}:{best['unit']}:{best['value']:g}"
    return bool(record["verdict"]["steers"]), record.get("output_score"), strength


def list_features(stack: ServedStack, spec: ListSpec) -> ListPage:
    """One page of the stage's features whose density lies in [min, max], in the requested order."""
    stage = stack.loaded.stages[spec.stage]
    density, peak, mean = feature_table(stage)
    kept = ((density >= spec.min_density) & (density <= spec.max_density)).nonzero().flatten()  # (F,)
    records = (stage.steerability or {}).get("features", {})
    bound = float((stage.steerability or {}).get("settings", {}).get("fluency_threshold", 1.0))
    if spec.steerable_only or spec.sort in (FeatureSort.STEERING, FeatureSort.OUTPUT_SCORE):
        measured = [f for f in kept.tolist() if f in records and (not spec.steerable_only
                                                                  or records[f]["verdict"]["steers"])]
        kept = torch.tensor(measured, dtype=torch.long)  # (F',)
    if spec.sort is FeatureSort.EXPLANATION_SCORE:  # scored explanations only
        scores = detection_scores(stack).get(stage.name, {})
        kept = torch.tensor([f for f in kept.tolist() if f in scores], dtype=torch.long)  # (F',)
        key = torch.tensor([scores[f] for f in kept.tolist()], dtype=torch.float64)
    elif spec.sort in (FeatureSort.STEERING, FeatureSort.OUTPUT_SCORE):
        key = torch.tensor([steering_key(records[f], spec.sort, bound) for f in kept.tolist()], dtype=torch.float64)
    elif spec.sort is FeatureSort.LABEL_F1:
        f1 = best_label_f1(stage)
        assert f1 is not None  # the validator requires labels for this sort
        key = f1[kept].double()
    else:
        key = density[kept] if spec.sort is FeatureSort.DENSITY else peak[kept].double()
    ordered = kept[_ranked(key, spec.descending)]
    start, stop, following = _window(spec.page, ordered.shape[0])
    chosen = ordered[start:stop].tolist()
    notes, f1 = stack.loaded.explanations.get(stage.name, {}), best_label_f1(stage)
    features = tuple(FeatureSummary(f, float(density[f]), float(peak[f]), float(mean[f]), notes.get(f, ""),
                                    None if f1 is None else float(f1[f]), *steering_summary(records.get(f)))
                     for f in chosen)
    return ListPage(stack.name, spec.stage, features, ordered.shape[0], following, dashboard_tokens(stage))
