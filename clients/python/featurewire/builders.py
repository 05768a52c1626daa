"""Builders for what a request edits and watches: interventions on feature values, raw steering vectors,
live feature conditions, token positions and decomposition options.

They are small frozen values that turn into protobuf only when a request is sent, so one can be kept
and reused across calls (like a Goodfire variant) and printed readably:

    Intervention.set("blocks.6.hook_resid_post", 123, 8.0, positions=Positions.generated())
    Condition.above("blocks.6.hook_resid_post", 77, 3.0).stop()
    Condition.above("blocks.6.hook_resid_post", 77, 3.0).enable(Intervention.ablate("blocks.6.hook_resid_post", 5))

Values are checked by the server (INVALID_ARGUMENT names the field); these only coerce types.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from featurewire.v1 import types_pb2 as t

OPS = ("ADD", "SET", "SCALE", "CLAMP", "ABLATE")
SCOPES = ("PROMPT", "GENERATED", "ALL", "RANGE")
STOP, ENABLE = "STOP", "ENABLE_INTERVENTIONS"


@dataclass(frozen=True)
class Positions:
    """Token positions (0-based over prompt then generated tokens); `end` None = open."""

    scope: str = "ALL"
    start: int = 0
    end: int | None = None

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")

    @classmethod
    def prompt(cls) -> Positions:
        return cls("PROMPT")

    @classmethod
    def generated(cls) -> Positions:
        return cls("GENERATED")

    @classmethod
    def all(cls) -> Positions:
        return cls("ALL")

    @classmethod
    def range(cls, start: int, end: int | None = None) -> Positions:
        """start <= p < end (end None: every position from start on)."""
        return cls("RANGE", int(start), None if end is None else int(end))

    @classmethod
    def at(cls, position: int) -> Positions:
        """Exactly one position."""
        return cls.range(position, position + 1)

    @classmethod
    def parse(cls, text: str) -> Positions:
        """"prompt", "generated", "all", "5" (one position), "3:8" or "3:" (a range)."""
        word = text.strip().upper()
        if word in ("PROMPT", "GENERATED", "ALL"):
            return cls(word)
        start, colon, end = text.partition(":")
        try:
            if not colon:
                return cls.at(int(start))
            return cls.range(int(start or 0), int(end) if end.strip() else None)
        except ValueError:
            raise ValueError(f"positions {text!r}: use prompt, generated, all, N, or START:END") from None

    def to_proto(self) -> t.Positions:
        scope = t.PositionScope.Value(f"POSITION_SCOPE_{self.scope}")
        if self.scope != "RANGE":
            return t.Positions(scope=scope)
        return t.Positions(scope=scope, start=self.start, end=self.end or 0)


def _positions(value: Positions | str | None) -> Positions | None:
    return Positions.parse(value) if isinstance(value, str) else value


@dataclass(frozen=True)
class Intervention:
    """An edit of one feature's value z at one stage; error-preserving on the server."""

    stage: str
    feature: int
    op: str
    value: float = 0.0
    lo: float = 0.0
    hi: float = 0.0
    positions: Positions | None = None  # None = the server's default, ALL
    condition: str = ""  # the id of an ENABLE condition that switches it on

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op must be one of {', '.join(OPS)}, got {self.op!r}")
        object.__setattr__(self, "feature", int(self.feature))
        object.__setattr__(self, "positions", _positions(self.positions))

    @classmethod
    def set(cls, stage: str, feature: int, value: float, *, positions: Positions | str | None = None) -> Intervention:
        """z' = value (pin the feature)."""
        return cls(stage, feature, "SET", value=float(value), positions=positions)

    @classmethod
    def add(cls, stage: str, feature: int, value: float, *, positions: Positions | str | None = None) -> Intervention:
        """z' = z + value (nudge)."""
        return cls(stage, feature, "ADD", value=float(value), positions=positions)

    @classmethod
    def scale(cls, stage: str, feature: int, factor: float, *,
              positions: Positions | str | None = None) -> Intervention:
        """z' = z * factor."""
        return cls(stage, feature, "SCALE", value=float(factor), positions=positions)

    @classmethod
    def clamp(cls, stage: str, feature: int, lo: float = -math.inf, hi: float = math.inf, *,
              positions: Positions | str | None = None) -> Intervention:
        """z' = min(max(z, lo), hi); lo > 0 switches an inactive feature on. Infinite bounds mean "no bound"."""
        lo, hi = float(lo), float(hi)
        big = 3.0e38  # the server wants finite bounds; float32 max stands in for "none"
        return cls(stage, feature, "CLAMP", lo=max(lo, -big), hi=min(hi, big), positions=positions)

    @classmethod
    def ablate(cls, stage: str, feature: int, *, positions: Positions | str | None = None) -> Intervention:
        """z' = 0."""
        return cls(stage, feature, "ABLATE", positions=positions)

    def at(self, positions: Positions | str) -> Intervention:
        return replace(self, positions=_positions(positions))

    def when(self, condition: Condition | str) -> Intervention:
        """Inactive until the ENABLE condition fires."""
        return replace(self, condition=condition.id if isinstance(condition, Condition) else condition)

    def to_proto(self) -> t.Intervention:
        op = t.InterventionOp.Value(f"INTERVENTION_OP_{self.op}")
        msg = t.Intervention(stage=self.stage, feature=self.feature, op=op, value=self.value, lo=self.lo, hi=self.hi,
                             condition_id=self.condition)
        if self.positions is not None:
            msg.positions.CopyFrom(self.positions.to_proto())
        return msg


@dataclass(frozen=True)
class Vector:
    """A raw direction added at a hookpoint: x' = x + scale * values (values: a list or a numpy array)."""

    hookpoint: str
    values: tuple[float, ...]
    scale: float | None = None  # None = 1
    positions: Positions | None = None
    condition: str = ""

    def __post_init__(self) -> None:
        values = self.values.tolist() if hasattr(self.values, "tolist") else self.values
        object.__setattr__(self, "values", tuple(float(v) for v in values))
        object.__setattr__(self, "positions", _positions(self.positions))

    def at(self, positions: Positions | str) -> Vector:
        return replace(self, positions=_positions(positions))

    def when(self, condition: Condition | str) -> Vector:
        return replace(self, condition=condition.id if isinstance(condition, Condition) else condition)

    def to_proto(self) -> t.SteeringVector:
        msg = t.SteeringVector(hookpoint=self.hookpoint, values=self.values, condition_id=self.condition)
        if self.scale is not None:
            msg.scale = self.scale
        if self.positions is not None:
            msg.positions.CopyFrom(self.positions.to_proto())
        return msg


Edit = Intervention | Vector


@dataclass(frozen=True)
class Condition:
    """A live test of one feature during generation; `.stop()` ends the branch, `.enable(...)` switches edits on.

    The id defaults to a readable one ("blocks.6.hook_resid_post:77>3"), echoed in ConditionFired events.
    """

    stage: str
    feature: int
    comparison: str  # ABOVE or BELOW
    threshold: float
    id: str = ""
    action: str | None = None
    positions: Positions | None = None  # None = the server's default, GENERATED
    edits: tuple[Edit, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.comparison not in ("ABOVE", "BELOW"):
            raise ValueError(f"comparison must be ABOVE or BELOW, got {self.comparison!r}")
        if not self.id:
            sign = ">" if self.comparison == "ABOVE" else "<"
            object.__setattr__(self, "id", f"{self.stage}:{self.feature}{sign}{self.threshold:g}"[-64:])
        object.__setattr__(self, "positions", _positions(self.positions))

    @classmethod
    def above(cls, stage: str, feature: int, threshold: float, *, id: str = "",
              positions: Positions | str | None = None) -> Condition:
        return cls(stage, int(feature), "ABOVE", float(threshold), id=id, positions=positions)

    @classmethod
    def below(cls, stage: str, feature: int, threshold: float, *, id: str = "",
              positions: Positions | str | None = None) -> Condition:
        return cls(stage, int(feature), "BELOW", float(threshold), id=id, positions=positions)

    def stop(self) -> Condition:
        """Finish the branch (FEATURE_CONDITION) when the condition fires."""
        return replace(self, action=STOP)

    def enable(self, *edits: Edit) -> Condition:
        """Switch these edits on (for every later position) when the condition fires."""
        return replace(self, action=ENABLE, edits=self.edits + tuple(e.when(self.id) for e in edits))

    def to_proto(self) -> t.Condition:
        if self.action is None:
            raise ValueError(f"condition {self.id!r} has no action: call .stop() or .enable(...)")
        msg = t.Condition(id=self.id, stage=self.stage, feature=self.feature,
                          comparison=t.Comparison.Value(f"COMPARISON_{self.comparison}"), threshold=self.threshold,
                          action=t.ConditionAction.Value(f"CONDITION_ACTION_{self.action}"))
        if self.positions is not None:
            msg.positions.CopyFrom(self.positions.to_proto())
        return msg


@dataclass(frozen=True)
class DecomposeOptions:
    """Which stages to report, how many features per token, error norms, and features always reported."""

    stages: tuple[str, ...] = ()  # empty = every stage
    top_k: int = 0  # 0 = the server's default
    include_error: bool = True
    always: Mapping[str, Sequence[int]] = field(default_factory=dict, hash=False)  # stage -> ids

    def to_proto(self) -> t.DecomposeOptions:
        return t.DecomposeOptions(stages=list(self.stages), top_k=self.top_k, include_error=self.include_error,
                                  feature_filter=[t.FeatureFilter(stage=s, ids=[int(i) for i in ids])
                                                  for s, ids in self.always.items()])


def decompose_options(value: Any) -> DecomposeOptions | None:
    """generate(decompose=...): None/False = off, True = defaults, an int = top_k, stage names, or options."""
    if value is None or value is False:
        return None
    if value is True:
        return DecomposeOptions()
    if isinstance(value, DecomposeOptions):
        return value
    if isinstance(value, int):
        return DecomposeOptions(top_k=value)
    if isinstance(value, str):
        return DecomposeOptions(stages=(value,))
    if isinstance(value, Iterable):
        return DecomposeOptions(stages=tuple(value))
    raise TypeError(f"decompose must be a bool, a top_k, stage names or DecomposeOptions, got {value!r}")


def split_edits(edits: Iterable[Edit], conditions: Iterable[Condition]) -> tuple[list[Intervention], list[Vector]]:
    """Interventions and vectors of a request: the given ones plus those carried by ENABLE conditions."""
    interventions: list[Intervention] = []
    vectors: list[Vector] = []
    for edit in [*edits, *(e for c in conditions for e in c.edits)]:
        if isinstance(edit, Intervention):
            interventions.append(edit)
        elif isinstance(edit, Vector):
            vectors.append(edit)
        else:
            raise TypeError(f"an edit must be an Intervention or a Vector, got {type(edit).__name__}")
    return interventions, vectors
