"""What the streaming RPCs yield: per-token features (Decompose), generation events (Generate) and
encoded batches (EncodeActivations), as frozen dataclasses.

A stream's header maps stage indices to names; the converters here attach the name to every
`StageCodes`, so a caller can look features up by stage name without keeping the header around.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from featurewire._base import TextToken, enum_name
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import types_pb2 as t


@dataclass(frozen=True)
class StageCodes:
    """The features of one token at one stage: ids by decreasing |value|, signed values, true L0, error norms."""

    stage: int
    name: str
    ids: tuple[int, ...]
    values: tuple[float, ...]
    l0: int
    error_norm: float | None = None
    predicted_error_norm: float | None = None

    def value(self, feature: int) -> float:
        """The feature's reported value, 0.0 when it is not among the reported ids."""
        for i, v in zip(self.ids, self.values, strict=False):
            if i == feature:
                return v
        return 0.0

    def top(self, n: int) -> list[tuple[int, float]]:
        """The n strongest (id, value) pairs."""
        return list(zip(self.ids[:n], self.values[:n], strict=False))

    def as_dict(self) -> dict[int, float]:
        return dict(zip(self.ids, self.values, strict=False))


@dataclass(frozen=True)
class StageRef:
    index: int
    name: str
    hookpoint: str
    d_sae: int
    signed: bool


@dataclass(frozen=True)
class TokenFeatures:
    """One token of a decomposed text and its features at each reported stage."""

    position: int
    id: int
    text: str
    features: tuple[StageCodes, ...]
    special: bool = False
    """A special token of the tokenizer (BOS, EOS, pad, ...): views of a text's features leave it out."""

    def stage(self, stage: str | int) -> StageCodes:
        """The codes at a stage, by name or index."""
        for codes in self.features:
            if stage in (codes.name, codes.stage):
                return codes
        raise KeyError(f"stage {stage!r} was not reported; reported: {[c.name for c in self.features]}")


@dataclass(frozen=True)
class DecomposeHeader:
    stack: str
    stack_digest: str
    stages: tuple[StageRef, ...]
    num_tokens: int
    top_k: int


@dataclass(frozen=True)
class Decomposition:
    """A whole Decompose stream, collected."""

    header: DecomposeHeader
    tokens: tuple[TokenFeatures, ...]

    def __iter__(self) -> Iterator[TokenFeatures]:
        return iter(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def trace(self, stage: str | int, feature: int) -> list[float]:
        """One feature's value at every token (0.0 where it was not reported)."""
        return [tok.stage(stage).value(feature) for tok in self.tokens]


# ------------------------------------------------------------------------------------------ Generate


@dataclass(frozen=True)
class Started:
    """The first Generate event: resolved stack, stages of any features, prompt tokens, seed, branches."""

    stack: str
    stack_digest: str
    stages: tuple[StageRef, ...]
    prompt: tuple[TextToken, ...]
    prompt_tokens: int
    seed: int
    max_new_tokens: int
    branches: tuple[str, ...]  # "STEERED", and "DEFAULT" with with_default


@dataclass(frozen=True)
class Token:
    """A generated token of one branch; `text` is what it appends to the branch's output."""

    branch: str
    index: int
    position: int
    token_id: int
    text: str
    logprob: float
    features: tuple[StageCodes, ...]

    def stage(self, stage: str | int) -> StageCodes:
        for codes in self.features:
            if stage in (codes.name, codes.stage):
                return codes
        raise KeyError(f"stage {stage!r} was not reported (pass decompose=... to generate)")


@dataclass(frozen=True)
class ConditionFired:
    branch: str
    condition_id: str
    stage: str
    feature: int
    position: int
    value: float
    action: str  # "ENABLE_INTERVENTIONS" or "STOP"


@dataclass(frozen=True)
class Finished:
    branch: str
    reason: str  # LENGTH, STOP_STRING, EOS, FEATURE_CONDITION, CANCELLED
    trigger: ConditionFired | None
    stop_string: str
    prompt_tokens: int
    generated_tokens: int
    text: str


GenerateEvent = Started | Token | ConditionFired | Finished


@dataclass(frozen=True)
class Generation:
    """A whole Generate stream, collected: the steered text and, with with_default, the default one."""

    started: Started
    text: str
    finished: Finished
    tokens: tuple[Token, ...]
    conditions: tuple[ConditionFired, ...]
    default_text: str | None = None
    default_finished: Finished | None = None
    default_tokens: tuple[Token, ...] = ()

    @property
    def seed(self) -> int:
        return self.started.seed


def collect_generation(events: Sequence[GenerateEvent]) -> Generation:
    started = next(e for e in events if isinstance(e, Started))
    finished = {e.branch: e for e in events if isinstance(e, Finished)}
    tokens = {b: tuple(e for e in events if isinstance(e, Token) and e.branch == b) for b in ("STEERED", "DEFAULT")}
    steered = finished["STEERED"]
    default = finished.get("DEFAULT")
    return Generation(started=started, text=steered.text, finished=steered, tokens=tokens["STEERED"],
                      conditions=tuple(e for e in events if isinstance(e, ConditionFired)),
                      default_text=default.text if default else None, default_finished=default,
                      default_tokens=tokens["DEFAULT"])


@dataclass(frozen=True)
class EncodedBatch:
    """EncodeActivations: the codes of one request's rows, in row order."""

    sequence: int
    rows: tuple[StageCodes, ...]


# ---------------------------------------------------------------------------------------- from_proto


def stage_codes(m: t.StageCodes, names: Mapping[int, str]) -> StageCodes:
    return StageCodes(stage=m.stage, name=names.get(m.stage, str(m.stage)), ids=tuple(m.ids), values=tuple(m.values),
                      l0=m.l0, error_norm=m.error_norm if m.HasField("error_norm") else None,
                      predicted_error_norm=m.predicted_error_norm if m.HasField("predicted_error_norm") else None)


def stage_refs(items: Any) -> tuple[StageRef, ...]:
    return tuple(StageRef(s.index, s.name, s.hookpoint, s.d_sae, s.signed) for s in items)


def decompose_header(m: pb.DecomposeHeader) -> DecomposeHeader:
    return DecomposeHeader(m.stack, m.stack_digest, stage_refs(m.stages), m.num_tokens, m.top_k)


def token_features(m: pb.TokenFeatures, names: Mapping[int, str]) -> TokenFeatures:
    return TokenFeatures(m.token.position, m.token.id, m.token.text, tuple(stage_codes(c, names) for c in m.features),
                         m.token.special)


def _branch(number: int) -> str:
    return enum_name(t.Branch, number, "BRANCH_")


def condition_fired(m: pb.ConditionEvent) -> ConditionFired:
    return ConditionFired(branch=_branch(m.branch), condition_id=m.condition_id, stage=m.stage, feature=m.feature,
                          position=m.position, value=m.value,
                          action=enum_name(t.ConditionAction, m.action, "CONDITION_ACTION_"))


def generate_event(m: pb.GenerateResponse, names: Mapping[int, str]) -> GenerateEvent | None:
    """One stream message as an event; None for an empty message (a newer server's unknown event)."""
    kind = m.WhichOneof("event")
    if kind == "token":
        e = m.token
        return Token(branch=_branch(e.branch), index=e.index, position=e.position, token_id=e.token_id, text=e.text,
                     logprob=e.logprob, features=tuple(stage_codes(c, names) for c in e.features))
    if kind == "condition":
        return condition_fired(m.condition)
    if kind == "finish":
        f = m.finish
        return Finished(branch=_branch(f.branch), reason=enum_name(pb.FinishReason, f.reason, "FINISH_REASON_"),
                        trigger=condition_fired(f.trigger) if f.HasField("trigger") else None,
                        stop_string=f.stop_string, prompt_tokens=f.prompt_tokens,
                        generated_tokens=f.generated_tokens, text=f.text)
    if kind == "header":
        h = m.header
        return Started(stack=h.stack, stack_digest=h.stack_digest, stages=stage_refs(h.stages),
                       prompt=tuple(TextToken(p.position, p.id, p.text) for p in h.prompt),
                       prompt_tokens=h.prompt_tokens, seed=h.seed, max_new_tokens=h.max_new_tokens,
                       branches=tuple(_branch(b) for b in h.branches))
    return None


class DecomposeReader:
    """Decompose messages as results, for Client's and AsyncClient's streams alike: the header comes first and
    its stage names label every later token."""

    def __init__(self) -> None:
        self.header: DecomposeHeader | None = None
        self._names: dict[int, str] = {}

    def start(self, m: pb.DecomposeResponse | None) -> DecomposeHeader:
        """Read the first message (None: the stream was empty)."""
        if m is None or m.WhichOneof("event") != "header":
            raise RuntimeError("the Decompose stream did not start with a header")
        self.header = decompose_header(m.header)
        self._names = {s.index: s.name for s in self.header.stages}
        return self.header

    def tokens(self, m: pb.DecomposeResponse) -> list[TokenFeatures]:
        """A chunk's tokens, in position order; none for any other event (a newer server's)."""
        if m.WhichOneof("event") != "chunk":
            return []
        return [token_features(token, self._names) for token in m.chunk.tokens]


class GenerateReader:
    """Generate messages as events, for Client's and AsyncClient's streams alike: Started names the stages later
    events refer to, and every event is kept so that a Generation also covers the events already iterated."""

    def __init__(self) -> None:
        self.events: list[GenerateEvent] = []
        self._names: dict[int, str] = {}

    def event(self, m: pb.GenerateResponse) -> GenerateEvent | None:
        event = generate_event(m, self._names)
        if isinstance(event, Started):
            self._names.update((s.index, s.name) for s in event.stages)
        if event is not None:
            self.events.append(event)
        return event

    def generation(self) -> Generation:
        return collect_generation(self.events)


def encoded_batch(m: pb.EncodeActivationsResponse, stage: str) -> EncodedBatch:
    """The rows of one EncodeActivations call all belong to the one stage it named."""
    names = {r.stage: stage for r in m.rows}
    return EncodedBatch(m.sequence, tuple(stage_codes(r, names) for r in m.rows))
