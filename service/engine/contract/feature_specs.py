"""Transport-free specs and results of the feature-browsing RPCs: GetFeature's dashboard, SearchFeatures and
ListFeatures.

Kept apart from service/engine/contract/specs.py (the streaming RPCs' contract) so each stays readable; the same rules
hold: specs are built by the validator, so every index in them is in range and every page offset came from a
page token this server signed for the same query.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Sign(StrEnum):
    POSITIVE = "positive"
    NEGATIVE = "negative"


class Reduction(StrEnum):
    MAX = "max"
    MEAN = "mean"


class TokenDirection(StrEnum):
    PROMOTES = "promotes"
    SUPPRESSES = "suppresses"


class FeatureSort(StrEnum):
    DENSITY = "density"
    MAX = "max"
    LABEL_F1 = "label_f1"
    STEERING = "steering"
    OUTPUT_SCORE = "output_score"
    EXPLANATION_SCORE = "explanation_score"


# ------------------------------------------------------------------------------------------------ specs


@dataclass(frozen=True)
class Page:
    """Which slice of a ranked result to return: [offset, offset + size), and the key its tokens are signed for."""

    offset: int
    size: int
    query: bytes  # the canonical query fields a next-page token is bound to


@dataclass(frozen=True)
class TextSearch:
    token_ids: tuple[int, ...]
    ranked: tuple[int, ...]  # positions of the tokens ranked (span or every non-special token); never empty
    reduction: Reduction


@dataclass(frozen=True)
class TokenSearch:
    token_id: int
    direction: TokenDirection


@dataclass(frozen=True)
class ExplanationSearch:
    words: tuple[str, ...]  # lower-case, distinct, in query order


@dataclass(frozen=True)
class SearchSpec:
    stack: str
    stages: tuple[int, ...]  # ascending; never empty
    query: TextSearch | TokenSearch | ExplanationSearch
    page: Page


@dataclass(frozen=True)
class ListSpec:
    stack: str
    stage: int
    min_density: float
    max_density: float
    sort: FeatureSort
    descending: bool
    page: Page
    steerable_only: bool = False


# ---------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ExampleToken:
    id: int
    text: str
    value: float  # the feature's signed value at this token


@dataclass(frozen=True)
class Example:
    tokens: tuple[ExampleToken, ...]
    index: int  # of the firing token in `tokens`
    value: float  # signed
    document: int
    position: int


@dataclass(frozen=True)
class QuantileGroup:
    low: float
    high: float
    share: float
    examples: tuple[Example, ...]


@dataclass(frozen=True)
class LabelToken:
    id: int
    text: str
    share: float  # of the side's firing mass
    firings: int
    occurrences: int


@dataclass(frozen=True)
class SideLabel:
    """A side's LLM-free token label (core.stack.dashboards.TokenLabel with its tokens decoded)."""

    tokens: tuple[LabelToken, ...]
    rule_size: int  # the first rule_size tokens form the scored rule
    precision: float
    recall: float
    f1: float


@dataclass(frozen=True)
class DashboardSide:
    sign: Sign
    count: int
    density: float
    mean: float
    max: float
    edges: tuple[float, ...]  # len(counts) + 1, or empty
    counts: tuple[int, ...]
    top_examples: tuple[Example, ...]
    quantiles: tuple[QuantileGroup, ...]
    label: SideLabel | None = None  # None: no labels in the dashboard, or it never fired on this side


@dataclass(frozen=True)
class Neighbour:
    stage: int
    feature: int
    cosine: float


@dataclass(frozen=True)
class CoOccurrence:
    feature: int
    jaccard: float


@dataclass(frozen=True)
class FeatureDashboard:
    tokens: int
    documents: int
    corpus: str
    context: int
    sides: tuple[DashboardSide, ...]
    neighbours: tuple[Neighbour, ...]
    cross_stage: tuple[Neighbour, ...]
    cooccurring: tuple[CoOccurrence, ...]


@dataclass(frozen=True)
class MetaLatents:
    ids: tuple[int, ...]
    values: tuple[float, ...]
    width: int


@dataclass(frozen=True)
class FeatureMatch:
    stage: int
    feature: int
    score: float
    sign: Sign | None = None
    position: int = 0
    density: float | None = None
    explanation: str = ""
    label_f1: float | None = None  # best over sides; None without labels
    label: str = ""  # the rule's tokens per side in one line


@dataclass(frozen=True)
class SearchPage:
    stack: str
    matches: tuple[FeatureMatch, ...]
    total: int
    next_offset: int | None  # None on the last page
    tokens: tuple[tuple[int, str], ...] = ()  # text search: (id, text) per position


@dataclass(frozen=True)
class FeatureSummary:
    feature: int
    density: float
    max: float
    mean: float
    explanation: str = ""
    label_f1: float | None = None
    steers: bool | None = None  # None: not measured
    output_score: float | None = None
    best_strength: str = ""  # "op:unit:value"; empty when it does not steer or was not measured


@dataclass(frozen=True)
class ListPage:
    stack: str
    stage: int
    features: tuple[FeatureSummary, ...]
    total: int
    next_offset: int | None
    tokens: int
