"""Plain request values and the server's request limits: what `service/convert/requests.py` extracts from protobuf
and `RequestValidator` checks.

Transport-free records (enums are the spec enums; None = unset / UNSPECIFIED = "the field's default"), so
the validator and its tests never touch protobuf, and `GetServerInfo` reports the same `Limits` the
validator enforces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.engine.contract.feature_specs import FeatureSort, Reduction, TokenDirection
from service.engine.contract.specs import Action, Comparison, Op, Scope

DEFAULT_TOP_K = 32
DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_TOP_N, MAX_TOP_N = 10, 100
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256
MAX_CONDITION_ID_CHARS = 64
DEFAULT_CHUNK_TOKENS, MAX_CHUNK_TOKENS = 32, 256
MAX_TEMPERATURE = 10.0
MAX_CHARS_PER_TOKEN = 64  # texts longer than this many characters per allowed token are refused untokenized
MAX_SEED = 2**64 - 1
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 20, 200  # SearchFeatures / ListFeatures results per page
MAX_QUERY_CHARS = 1000  # SearchFeatures by explanation: the query's length


@dataclass(frozen=True)
class Limits:
    """Defaults and bounds of request fields, as GetServerInfo reports them (Limits message)."""

    max_new_tokens: int
    default_max_new_tokens: int
    max_prompt_tokens: int
    max_top_k: int
    default_top_k: int
    max_interventions: int
    max_conditions: int
    max_stop_strings: int
    max_top_n: int
    max_page_size: int
    default_page_size: int
    max_batch_vectors: int
    max_message_bytes: int
    queue_size: int

    @property
    def max_context(self) -> int:
        """Positions a request can ever reach: the longest prompt plus the most generated tokens."""
        return self.max_prompt_tokens + self.max_new_tokens

    @classmethod
    def from_bounds(cls, *, max_new_tokens: int, max_prompt_tokens: int, max_top_k: int, max_interventions: int,
                    max_batch_vectors: int, max_message_bytes: int, queue_size: int) -> Limits:
        """The limits for the deployment's bounds; the defaults and fixed bounds are the engine's own."""
        return cls(
            max_new_tokens=max_new_tokens, default_max_new_tokens=min(DEFAULT_MAX_NEW_TOKENS, max_new_tokens),
            max_prompt_tokens=max_prompt_tokens, max_top_k=max_top_k, default_top_k=min(DEFAULT_TOP_K, max_top_k),
            max_interventions=max_interventions, max_conditions=max_interventions, max_stop_strings=MAX_STOP_STRINGS,
            max_top_n=MAX_TOP_N, max_page_size=MAX_PAGE_SIZE, default_page_size=DEFAULT_PAGE_SIZE,
            max_batch_vectors=max_batch_vectors, max_message_bytes=max_message_bytes, queue_size=queue_size,
        )


# ---------------------------------------------------------------------------------- plain request values


@dataclass(frozen=True)
class InputIn:
    """Input: exactly one of text / token_ids; add_special_tokens None = true."""

    text: str | None = None
    token_ids: Sequence[int] | None = None
    add_special_tokens: bool | None = None


@dataclass(frozen=True)
class PositionsIn:
    scope: Scope | None = None  # None = the containing field's default
    start: int = 0
    end: int = 0  # 0 = open


@dataclass(frozen=True)
class DecomposeOptionsIn:
    stages: Sequence[str] = ()
    top_k: int = 0
    include_error: bool = False
    feature_filter: Sequence[tuple[str, Sequence[int]]] = ()  # (stage name, ids)


@dataclass(frozen=True)
class SamplingIn:
    max_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    seed: int | None = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class InterventionIn:
    stage: str
    feature: int
    op: Op | None
    value: float = 0.0
    lo: float = 0.0
    hi: float = 0.0
    positions: PositionsIn | None = None
    condition_id: str = ""


@dataclass(frozen=True)
class SteeringIn:
    hookpoint: str
    values: Sequence[float]
    scale: float | None = None
    positions: PositionsIn | None = None
    condition_id: str = ""


@dataclass(frozen=True)
class ConditionIn:
    id: str
    stage: str
    feature: int
    comparison: Comparison | None
    threshold: float
    action: Action | None
    positions: PositionsIn | None = None


@dataclass(frozen=True)
class SpanIn:
    start: int
    end: int


@dataclass(frozen=True)
class TextQueryIn:
    text: str
    span: SpanIn | None = None
    reduction: Reduction | None = None  # None = MAX
    add_special_tokens: bool | None = None


@dataclass(frozen=True)
class TokenQueryIn:
    text: str | None = None  # exactly one of text and id
    id: int | None = None
    direction: TokenDirection | None = None  # None = PROMOTES


@dataclass(frozen=True)
class SearchIn:
    """SearchFeaturesRequest: exactly one of text / token / explanation (all None = no query set)."""

    stack: str = ""
    text: TextQueryIn | None = None
    token: TokenQueryIn | None = None
    explanation: str | None = None
    stages: Sequence[str] = ()
    page_size: int = 0
    page_token: str = ""


@dataclass(frozen=True)
class ListFeaturesIn:
    stack: str = ""
    stage: str = ""
    min_density: float | None = None
    max_density: float | None = None
    sort: FeatureSort | None = None  # None = DENSITY
    descending: bool = False
    page_size: int = 0
    page_token: str = ""
    steerable_only: bool = False
