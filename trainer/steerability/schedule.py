"""What the steerability measure steers with, and when it calls a feature steerable.

A strength is an operation on the feature's code (ADD: z_f + a; SET: z_f = a) with its amount in one of two
units: `max`, the feature's largest held-out activation from its dashboard (the unit of a feature's own scale),
or `norm`, the hookpoint's mean residual-stream norm (ADD only: the amount is chosen so that the edit's vector
has that many mean norms, which matters when a feature's max is small against the residual stream). Amounts
are magnitudes; the sign follows the feature's side (negative for the negative side of a signed SA-GSAE code).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

OPS = ("add", "set")
UNITS = ("max", "norm")
LIMITS = {"max": 64.0, "norm": 8.0}
"""Largest value allowed per unit: beyond 64x a feature's max or 8 residual norms every text breaks."""

DEFAULT_STRENGTHS = ("add:max:0,1,2,4,8,16", "set:max:1,2,4,8,16", "add:norm:0.25,0.5,1,2")

EXPRESSION_THRESHOLD = 0.25
"""A feature steers when its re-read firing rate on the steered tokens exceeds the default branch's by this share
of the generated tokens. Mid-density features fire on at most 1% of held-out tokens, so 25 points is 25x their
base rate: no default continuation gets there, and a feature must be expressed on every fourth token."""
FLUENCY_THRESHOLD = 1.0
"""... at a fluency cost (extra nats per token under the unsteered model) of at most this much: the steered text is
then at most e times less likely per token, on average, than the model's own continuation of the same opening. It
is the starting point the issue proposed; it has not yet been calibrated against texts judged broken on the demo
stack (the report's section 6 shows the measured costs next to the steered texts)."""
REPETITION_THRESHOLD = 0.5
"""... and with at most this share of its generated bigrams repeating earlier ones. The cross-entropy misses loops:
once a token repeats, the model predicts the next repeat well, so " genetic genetic genetic ..." cost only 0.68
nats/token more than the default on a demo-configuration stack, while its repetition rate was 0.93. There, default
continuations repeated 0.03-0.27 of their bigrams and the looping steered texts 0.68-0.93. When the default
continuations themselves repeat more (a tiny random model loops on everything), their rate is the bound."""


@dataclass(frozen=True, order=True)
class Strength:
    """One point of the schedule: `op` at `value` times the `unit`."""

    op: str
    unit: str
    value: float

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown steering op {self.op!r}; allowed: {', '.join(OPS)}")
        if self.unit not in UNITS:
            raise ValueError(f"unknown strength unit {self.unit!r}; allowed: {', '.join(UNITS)}")
        if self.op == "set" and self.unit == "norm":
            raise ValueError("SET takes strengths in units of the feature's max only (set:max:...); "
                             "norm units are for ADD (add:norm:...)")
        limit = LIMITS[self.unit]
        if not (math.isfinite(self.value) and 0 <= self.value <= limit):
            raise ValueError(f"strength {self.value!r} in units of {self.unit} is out of range; "
                             f"allowed: 0 to {limit:g}")

    @property
    def family(self) -> str:
        return f"{self.op}:{self.unit}"

    @property
    def label(self) -> str:
        return f"{self.op}:{self.unit}:{self.value:g}"

    @property
    def is_identity(self) -> bool:
        """ADD 0 changes no code: it is the default branch itself."""
        return self.op == "add" and self.value == 0


def parse_strengths(specs: Sequence[str]) -> list[Strength]:
    """Strengths from `OP:UNIT:V1,V2,...` items (e.g. add:max:0,1,2,4 set:max:4 add:norm:0.5,1), sorted, unique."""
    if not specs:
        raise ValueError("no strengths given; expected items like add:max:0,1,2,4,8,16")
    out: set[Strength] = set()
    for spec in specs:
        parts = spec.split(":")
        if len(parts) != 3 or not parts[2]:
            raise ValueError(f"strength item {spec!r} must be OP:UNIT:V1,V2,... with OP in {OPS} and UNIT in {UNITS}")
        op, unit, values = parts[0].lower(), parts[1].lower(), parts[2]
        for text in values.split(","):
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"strength item {spec!r}: {text!r} is not a number") from None
            out.add(Strength(op, unit, value))
    return sorted(out)


def needs_max(strengths: Sequence[Strength]) -> bool:
    return any(s.unit == "max" and not s.is_identity for s in strengths)
