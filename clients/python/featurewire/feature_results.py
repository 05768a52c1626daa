"""Results of feature browsing as frozen dataclasses: a feature's dashboard (GetFeature), search results
(SearchFeatures) and a stage's feature list (ListFeatures).

Kept apart from results.py so each module stays short; the same rules hold: enums as short names ("POSITIVE"),
unset optional fields as None, repeated fields as tuples, and these `from_proto` functions are the only code that
reads the messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from featurewire._base import TextToken
from featurewire.v1 import featurewire_pb2 as pb


def _sign(number: int) -> str | None:
    """SIGN_NEGATIVE -> "NEGATIVE"; unspecified -> None."""
    if number == pb.SIGN_UNSPECIFIED:
        return None
    try:
        return pb.Sign.Name(number).removeprefix("SIGN_")
    except ValueError:
        return str(number)


@dataclass(frozen=True)
class ExampleToken:
    id: int
    text: str
    value: float  # the feature's signed value at this token


@dataclass(frozen=True)
class DashboardExample:
    """A window of tokens around one token where the feature fired (`index` in `tokens`)."""

    tokens: tuple[ExampleToken, ...]
    index: int
    value: float  # signed, at the firing token
    document: int
    position: int

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)

    def marked(self, left: str = "[[", right: str = "]]") -> str:
        """The window's text with the firing token between `left` and `right`."""
        return "".join(f"{left}{t.text}{right}" if n == self.index else t.text for n, t in enumerate(self.tokens))


@dataclass(frozen=True)
class QuantileGroup:
    low: float
    high: float
    share: float  # of the side's firings
    examples: tuple[DashboardExample, ...]


@dataclass(frozen=True)
class LabelToken:
    id: int
    text: str
    share: float  # of the side's firing mass
    firings: int
    occurrences: int  # of the token among the dashboard pass's tokens


@dataclass(frozen=True)
class TokenLabel:
    """A side's LLM-free label: tokens by firing mass, and the exact precision/recall/F1 of the rule "fires
    exactly where the token is one of the first `rule_size` tokens" over the dashboard pass."""

    tokens: tuple[LabelToken, ...]
    rule_size: int
    precision: float
    recall: float
    f1: float

    @property
    def rule(self) -> tuple[LabelToken, ...]:
        return self.tokens[: self.rule_size]

    def describe(self) -> str:
        """e.g. `' the' 62%, ' a' 21% (token F1 0.71: precision 0.80, recall 0.64)`."""
        tokens = ", ".join(f"{t.text!r} {t.share:.0%}" for t in self.rule)
        return f"{tokens} (token F1 {self.f1:.2f}: precision {self.precision:.2f}, recall {self.recall:.2f})"


@dataclass(frozen=True)
class DashboardSide:
    """One sign of a feature: POSITIVE, or NEGATIVE on a signed stage (magnitudes |z|)."""

    sign: str
    count: int
    density: float
    mean: float
    max: float
    histogram_edges: tuple[float, ...]  # len(histogram_counts) + 1, or empty
    histogram_counts: tuple[int, ...]
    top_examples: tuple[DashboardExample, ...]
    quantiles: tuple[QuantileGroup, ...]
    label: TokenLabel | None = None  # None: no labels in the dashboard, or it never fired on this side


@dataclass(frozen=True)
class FeatureNeighbour:
    stage: str
    stage_index: int
    feature: int
    cosine: float


@dataclass(frozen=True)
class CoOccurringFeature:
    feature: int
    jaccard: float


@dataclass(frozen=True)
class FeatureDashboard:
    """What the stack's dashboard pass recorded about a feature (`featurewire-train dashboards`)."""

    tokens: int
    documents: int
    corpus: str
    context: int
    sides: tuple[DashboardSide, ...]
    neighbours: tuple[FeatureNeighbour, ...]
    cross_stage_neighbours: tuple[FeatureNeighbour, ...]
    cooccurring: tuple[CoOccurringFeature, ...]

    def side(self, sign: str = "POSITIVE") -> DashboardSide:
        for side in self.sides:
            if side.sign == sign.upper():
                return side
        raise KeyError(f"no {sign} side; sides: {[s.sign for s in self.sides]}")


@dataclass(frozen=True)
class MetaLatents:
    ids: tuple[int, ...]
    values: tuple[float, ...]
    width: int


@dataclass(frozen=True)
class FeatureMatch:
    stage: str
    stage_index: int
    feature: int
    score: float
    sign: str | None  # text search on a signed stage: POSITIVE or NEGATIVE
    position: int  # text search: the token where |z| peaked
    density: float | None
    explanation: str
    label_f1: float | None = None  # best over sides; None without labels
    label: str = ""  # the label's rule tokens per side, in one line


@dataclass(frozen=True)
class SearchResult:
    """One page of SearchFeatures; pass `next_page_token` back (same query) for the next, "" after the last."""

    stack: str
    features: tuple[FeatureMatch, ...]
    next_page_token: str
    total: int
    tokens: tuple[TextToken, ...]  # text search: the text's tokens


@dataclass(frozen=True)
class FeatureSummary:
    feature: int
    density: float
    max: float
    mean: float
    explanation: str
    label_f1: float | None = None
    steers: bool | None = None  # the measured verdict; None when not measured
    output_score: float | None = None
    best_strength: str = ""  # "op:unit:value"; empty when it does not steer or was not measured


@dataclass(frozen=True)
class SteeringPoint:
    op: str  # "add" or "set"
    unit: str  # "max" (times the held-out max) or "norm" (times the hookpoint's mean residual norm)
    value: float
    amount: float  # the signed code value applied
    expression: float  # share of generated tokens on which the feature fires when re-read unedited
    lift: float  # expression minus the default branch's
    concept_share: float
    fluency_cost: float  # nats/token beyond the default continuation's, under the unsteered model
    repetition: float
    examples: tuple[str, ...]


@dataclass(frozen=True)
class Steerability:
    """GetFeature's measured steerability (featurewire-train steerability)."""

    steers: bool
    best: SteeringPoint | None
    curve: tuple[SteeringPoint, ...]
    output_score: float
    default_expression: float
    default_examples: tuple[str, ...]
    expression_threshold: float
    fluency_threshold: float
    repetition_threshold: float = 0.0


@dataclass(frozen=True)
class FeatureList:
    """One page of ListFeatures."""

    stack: str
    stage: str
    stage_index: int
    features: tuple[FeatureSummary, ...]
    next_page_token: str
    total: int
    tokens: int


# ------------------------------------------------------------------------------------------ from_proto


def _example(m: Any) -> DashboardExample:
    return DashboardExample(tuple(ExampleToken(t.id, t.text, t.value) for t in m.tokens), m.index, m.value,
                            m.document, m.position)


def _neighbours(items: Any) -> tuple[FeatureNeighbour, ...]:
    return tuple(FeatureNeighbour(n.stage, n.stage_index, n.feature, n.cosine) for n in items)


def _label(m: pb.DashboardSide) -> TokenLabel | None:
    if not m.HasField("label"):
        return None
    label = m.label
    return TokenLabel(tuple(LabelToken(t.id, t.text, t.share, t.firings, t.occurrences) for t in label.tokens),
                      label.rule_size, label.precision, label.recall, label.f1)


def dashboard(m: pb.FeatureDashboard) -> FeatureDashboard:
    sides = tuple(DashboardSide(
        sign=_sign(s.sign) or "POSITIVE", count=s.count, density=s.density, mean=s.mean, max=s.max,
        histogram_edges=tuple(s.histogram.edges), histogram_counts=tuple(s.histogram.counts),
        top_examples=tuple(_example(x) for x in s.top_examples),
        quantiles=tuple(QuantileGroup(q.low, q.high, q.share, tuple(_example(x) for x in q.examples))
                        for q in s.quantiles), label=_label(s)) for s in m.sides)
    return FeatureDashboard(tokens=m.tokens, documents=m.documents, corpus=m.corpus, context=m.context, sides=sides,
                            neighbours=_neighbours(m.neighbours),
                            cross_stage_neighbours=_neighbours(m.cross_stage_neighbours),
                            cooccurring=tuple(CoOccurringFeature(c.feature, c.jaccard) for c in m.cooccurring))


def _point(p: pb.SteeringPoint) -> SteeringPoint:
    return SteeringPoint(p.op, p.unit, p.value, p.amount, p.expression, p.lift, p.concept_share, p.fluency_cost,
                         p.repetition, tuple(p.examples))


@dataclass(frozen=True)
class ExplanationScore:
    name: str  # "detection" or "fuzzing"
    balanced_accuracy: float  # 0.5 is chance
    examples: int
    unparsed: int  # answers that were neither yes nor no (counted as wrong)


@dataclass(frozen=True)
class ExplanationSource:
    """Where an LLM explanation came from and how it scored (featurewire-train explain)."""

    explainer: str
    scorer: str
    prompt_version: str
    date: str
    scores: tuple[ExplanationScore, ...]

    def describe(self) -> str:
        """e.g. `by MODEL (featurewire-explain-v1, 2026-12-08): detection 0.81 (20), fuzzing 0.66 (20)`."""
        scores = ", ".join(f"{s.name} {s.balanced_accuracy:.2f} ({s.examples})" for s in self.scores)
        return f"by {self.explainer} ({self.prompt_version}, {self.date[:10]}): {scores or 'not scored'}"


def explanation_source(m: pb.ExplanationSource) -> ExplanationSource:
    return ExplanationSource(m.explainer, m.scorer, m.prompt_version, m.date,
                             tuple(ExplanationScore(s.name, s.balanced_accuracy, s.examples, s.unparsed)
                                   for s in m.scores))


def steerability(m: pb.Steerability) -> Steerability:
    return Steerability(m.steers, _point(m.best) if m.HasField("best") else None, tuple(_point(p) for p in m.curve),
                        m.output_score, m.default_expression, tuple(m.default_examples), m.expression_threshold,
                        m.fluency_threshold, m.repetition_threshold)


def meta_latents(m: pb.MetaLatents) -> MetaLatents:
    return MetaLatents(tuple(m.ids), tuple(m.values), m.width)


def search_result(m: pb.SearchFeaturesResponse) -> SearchResult:
    features = tuple(FeatureMatch(stage=f.stage, stage_index=f.stage_index, feature=f.feature, score=f.score,
                                  sign=_sign(f.sign), position=f.position,
                                  density=f.density if f.HasField("density") else None, explanation=f.explanation,
                                  label_f1=f.label_f1 if f.HasField("label_f1") else None, label=f.label)
                     for f in m.features)
    return SearchResult(stack=m.stack, features=features, next_page_token=m.next_page_token, total=m.total,
                        tokens=tuple(TextToken(t.position, t.id, t.text) for t in m.tokens))


def feature_list(m: pb.ListFeaturesResponse) -> FeatureList:
    return FeatureList(stack=m.stack, stage=m.stage, stage_index=m.stage_index,
                       features=tuple(FeatureSummary(f.feature, f.density, f.max, f.mean, f.explanation,
                                                     f.label_f1 if f.HasField("label_f1") else None,
                                                     f.steers if f.HasField("steers") else None,
                                                     f.output_score if f.HasField("output_score") else None,
                                                     f.best_strength)
                                      for f in m.features),
                       next_page_token=m.next_page_token, total=m.total, tokens=m.tokens)
