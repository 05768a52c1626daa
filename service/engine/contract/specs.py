"""Transport-free request specs and result events: the contract between the servicer (which converts
protobuf to and from these) and the engine (which validates nothing twice and computes).

Specs are built by service/engine/contract/validation.py, so every value in them is already checked: stage and
feature indices are in range, floats are finite, positions are sane. Stage references are resolved to
indices of the request's stack. Positions count from 0 over the prompt (BOS included), then the
generated tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from service.engine.contract.feature_specs import FeatureDashboard, MetaLatents


class Op(StrEnum):
    """How an intervention edits one feature's value z: z+v, v, z·v, clamp(z, lo, hi), 0."""

    ADD = "add"
    SET = "set"
    SCALE = "scale"
    CLAMP = "clamp"
    ABLATE = "ablate"


class Scope(StrEnum):
    PROMPT = "prompt"
    GENERATED = "generated"
    ALL = "all"
    RANGE = "range"


class Comparison(StrEnum):
    ABOVE = "above"
    BELOW = "below"


class Action(StrEnum):
    ENABLE_INTERVENTIONS = "enable_interventions"
    STOP = "stop"


class Branch(StrEnum):
    STEERED = "steered"
    DEFAULT = "default"


class FinishReason(StrEnum):
    LENGTH = "length"
    STOP_STRING = "stop_string"
    EOS = "eos"
    FEATURE_CONDITION = "feature_condition"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Positions:
    """Which token positions an edit or condition applies to; RANGE is [start, end), end None = open."""

    scope: Scope = Scope.ALL
    start: int = 0
    end: int | None = None

    def contains(self, position: int, prompt_len: int) -> bool:
        if self.scope is Scope.PROMPT:
            return position < prompt_len
        if self.scope is Scope.GENERATED:
            return position >= prompt_len
        if self.scope is Scope.RANGE:
            return position >= self.start and (self.end is None or position < self.end)
        return True


@dataclass(frozen=True)
class InterventionSpec:
    stage: int
    feature: int
    op: Op
    value: float = 0.0
    lo: float = 0.0
    hi: float = 0.0
    positions: Positions = Positions()
    condition_id: str = ""  # "" = active from the start; else enabled when that condition fires


@dataclass(frozen=True)
class SteeringSpec:
    """A raw vector added at a hookpoint: h += scale · vector."""

    hookpoint: str
    vector: tuple[float, ...]
    scale: float = 1.0
    positions: Positions = Positions()
    condition_id: str = ""


@dataclass(frozen=True)
class ConditionSpec:
    """Fires once, the first time feature `feature` of `stage` crosses `threshold` at a position in scope."""

    id: str
    stage: int
    feature: int
    comparison: Comparison
    threshold: float
    action: Action
    positions: Positions = Positions(Scope.GENERATED)


@dataclass(frozen=True)
class DecomposeSpec:
    stack: str
    token_ids: tuple[int, ...]
    stages: tuple[int, ...]  # resolved, ascending; never empty
    top_k: int
    include_error: bool = True
    feature_filter: dict[int, tuple[int, ...]] = field(default_factory=dict)  # stage -> ids always reported
    chunk_tokens: int = 32


@dataclass(frozen=True)
class SamplingSpec:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class GenerateSpec:
    stack: str  # "" only when the server has no stack and the request uses none
    prompt_ids: tuple[int, ...]
    sampling: SamplingSpec
    interventions: tuple[InterventionSpec, ...] = ()
    steering: tuple[SteeringSpec, ...] = ()
    conditions: tuple[ConditionSpec, ...] = ()
    decompose: DecomposeSpec | None = None  # per generated token features (token_ids unused)
    with_default: bool = False


@dataclass(frozen=True)
class ScoreSpec:
    stack: str
    token_ids: tuple[int, ...]
    interventions: tuple[InterventionSpec, ...] = ()
    steering: tuple[SteeringSpec, ...] = ()
    splice_stages: tuple[int, ...] = ()


# ------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class StageCodes:
    """One token at one stage: the reported features (ranked by |value|), L0 and error norms."""

    stage: int
    ids: tuple[int, ...]
    values: tuple[float, ...]
    l0: int
    error_norm: float | None = None
    predicted_error_norm: float | None = None


@dataclass(frozen=True)
class TokenFeatures:
    position: int
    token_id: int
    text: str
    features: tuple[StageCodes, ...]
    special: bool = False
    """A special token of the tokenizer (BOS, EOS, pad, ...)."""


@dataclass(frozen=True)
class DecomposeHeader:
    stack: str
    stack_digest: str
    stages: tuple[int, ...]
    num_tokens: int
    top_k: int


@dataclass(frozen=True)
class DecomposeChunk:
    tokens: tuple[TokenFeatures, ...]


@dataclass(frozen=True)
class GenerateHeader:
    stack: str
    stack_digest: str
    stages: tuple[int, ...]
    prompt: tuple[tuple[int, str], ...]  # (token id, text) per prompt position
    seed: int
    max_new_tokens: int
    branches: tuple[Branch, ...]


@dataclass(frozen=True)
class TokenEvent:
    branch: Branch
    index: int  # 0-based among generated tokens of this branch
    position: int
    token_id: int
    text: str  # the text this token adds to the branch's output
    logprob: float
    features: tuple[StageCodes, ...] = ()


@dataclass(frozen=True)
class ConditionEvent:
    branch: Branch
    condition_id: str
    stage: int
    feature: int
    position: int
    value: float
    action: Action


@dataclass(frozen=True)
class FinishEvent:
    branch: Branch
    reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    text: str
    trigger: ConditionEvent | None = None
    stop_string: str = ""


@dataclass(frozen=True)
class ScoreResult:
    token_ids: tuple[int, ...]
    scored_tokens: int
    clean_ce: float
    edited_ce: float
    kl: float
    edited: bool
    clean_ce_per_token: tuple[float, ...]
    edited_ce_per_token: tuple[float, ...]
    kl_per_token: tuple[float, ...]


@dataclass(frozen=True)
class TokenScore:
    id: int
    text: str
    score: float


@dataclass(frozen=True)
class FeatureInfo:
    stack: str
    stage: int
    feature: int
    decoder_norm: float
    top_tokens: tuple[TokenScore, ...]
    bottom_tokens: tuple[TokenScore, ...]
    density: float | None = None
    top_examples: tuple[tuple[str, int, float], ...] = ()  # (text, position, value)
    dashboard: FeatureDashboard | None = None
    explanation: str = ""
    meta_latents: MetaLatents | None = None
    steerability: dict | None = None  # the stored record (core/stack/steerability.py) and the verdict's thresholds
    explanation_source: dict | None = None  # a scored explanation record (core/stack/explanations.py)
