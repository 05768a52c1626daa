"""Feature edits, steering vectors and conditions of one request, for one branch, as write hooks.

An `EditPlan` holds what one branch of one request asked for and the state that evolves while it runs
(which conditions fired, from which position their edits are on). For each forward pass over absolute
positions [offset, offset + length) it builds a `Chunk`: the write hooks for that pass, the codes kept
for per-token decomposition, and the bookkeeping to tell whether the pass must be redone. Nothing lives
at module level, so two requests (or two branches) never see each other's edits.

At a stage the handler encodes what arrives (with the activation that flowed at the source stage for a
residual stage), tests the conditions on those pre-edit codes, edits the codes at the positions in scope
(vectorised: one column slice per intervention) and adds the error-preserving delta (z' − z) W_dec / s
through the stack runtime. When no code changed, it returns the very tensor it got, so e.g. ABLATE of an
inactive feature changes nothing bit-for-bit. A steering vector at a hookpoint where a stage also reads
is added first; the stage then encodes the steered activation.

Scopes are intervals of positions (PROMPT [0, P), GENERATED [P, ∞), RANGE [a, b), ALL), and a condition
that fires at position p enables its edits on [p + 1, ∞), so every edit covers one interval per pass.
Conditions fire once, at the first position in scope where the comparison holds (ABOVE z > t, BELOW
z < t), and are tested on what arrives at their stage, before that stage's own edits.

Within one pass an edit at a stage that runs *before* the stage of the condition enabling it cannot see
the firing. A decode step covers one position, so this only matters for a pass over several positions
(the prompt): `Chunk.rerun_from()` then says from which position the result is stale, the caller drops
the later firings with `EditPlan.forget_after` and runs the pass again; the firing stays, so this
terminates (at most once per condition).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from core.errors import InvalidRequest
from core.host.hooks import ActivationEdit
from core.stack.runtime import RuntimeStage, StackRuntime, StageResult
from service.engine.contract.specs import (
    Action,
    Branch,
    Comparison,
    ConditionEvent,
    ConditionSpec,
    InterventionSpec,
    Op,
    Positions,
    Scope,
    SteeringSpec,
)

ErrorPredictor = Callable[[RuntimeStage, Tensor, "Tensor | None"], "Tensor | None"]
"""(stage, h (n, d) as it arrived, prev (n, d) or None) -> predicted error norm (n,) or None."""


def scope_interval(positions: Positions, prompt_len: int) -> tuple[int, int | None]:
    """The absolute positions a scope covers, as [start, end); end None = open."""
    if positions.scope is Scope.PROMPT:
        return 0, prompt_len
    if positions.scope is Scope.GENERATED:
        return prompt_len, None
    if positions.scope is Scope.RANGE:
        return positions.start, positions.end
    return 0, None


def apply_op(column: Tensor, spec: InterventionSpec) -> None:
    """Edit a view of one feature's codes in place: z+v, v, z·v, clamp(z, lo, hi) or 0."""
    if spec.op is Op.ADD:
        column.add_(spec.value)
    elif spec.op is Op.SET:
        column.fill_(spec.value)
    elif spec.op is Op.SCALE:
        column.mul_(spec.value)
    elif spec.op is Op.CLAMP:
        column.clamp_(spec.lo, spec.hi)
    else:
        column.zero_()


@dataclass(frozen=True)
class KeptCodes:
    """A stage's codes for positions [start, start + n) of one pass, for per-token decomposition."""

    start: int
    codes: Tensor  # (n, d_sae), after this stage's edits
    error_norm: Tensor | None  # (n,) ‖h − ĥ‖ of what arrived (edits preserve it)
    predicted: Tensor | None  # (n,)


@dataclass
class _Firing:
    event: ConditionEvent
    order: int  # the condition's index in the request, to order events at one position
    tick: int  # when in its pass it fired (see Chunk)
    source: object  # the Chunk it fired in


class EditPlan:
    """What one branch of one request edits, tests and reads, plus the condition state it accumulates."""

    def __init__(
        self,
        runtime: StackRuntime | None,
        *,
        branch: Branch = Branch.STEERED,
        interventions: Sequence[InterventionSpec] = (),
        steering: Sequence[SteeringSpec] = (),
        conditions: Sequence[ConditionSpec] = (),
        decompose: Iterable[int] = (),
        include_error: bool = False,
        predict_error: ErrorPredictor | None = None,
        splice: Iterable[int] = (),
        keep_from: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.runtime = runtime
        self.branch = branch
        self.decompose, self.splice = set(decompose), set(splice)
        if runtime is None and (interventions or conditions or self.decompose or self.splice):
            raise InvalidRequest("interventions, conditions, decomposition and splicing need an SAE stack")
        self.include_error, self.predict_error, self.keep_from = include_error, predict_error, keep_from
        self.interventions: dict[int, list[InterventionSpec]] = {}
        for spec in interventions:
            self.interventions.setdefault(spec.stage, []).append(spec)
        self.conditions: dict[int, list[tuple[int, ConditionSpec]]] = {}
        for order, cond in enumerate(conditions):
            self.conditions.setdefault(cond.stage, []).append((order, cond))
        self._condition_by_id = {cond.id: cond for cond in conditions}
        self.steering: dict[str, list[tuple[SteeringSpec, Tensor]]] = {}
        for vec in steering:
            vector = torch.tensor(vec.vector, dtype=torch.float32, device=device) * vec.scale  # (d,)
            self.steering.setdefault(vec.hookpoint, []).append((vec, vector))
        self.fired: dict[str, _Firing] = {}
        self._reported: set[str] = set()

    # ------------------------------------------------------------------------------- condition state

    def enabled_from(self, condition_id: str) -> int | None:
        """The first position where edits gated by `condition_id` apply; 0 for ungated, None before it fires."""
        if not condition_id:
            return 0
        firing = self.fired.get(condition_id)
        return None if firing is None else firing.event.position + 1

    def fire(self, order: int, cond: ConditionSpec, position: int, value: float, tick: int, source: object) -> None:
        event = ConditionEvent(self.branch, cond.id, cond.stage, cond.feature, position, value, cond.action)
        self.fired[cond.id] = _Firing(event, order, tick, source)

    def take_events(self) -> list[ConditionEvent]:
        """Condition events not handed out yet, in position order (request order at one position)."""
        new = sorted((f for cid, f in self.fired.items() if cid not in self._reported),
                     key=lambda f: (f.event.position, f.order))
        self._reported.update(f.event.condition_id for f in new)
        return [f.event for f in new]

    @property
    def stop(self) -> ConditionEvent | None:
        """The earliest STOP condition that fired, if any."""
        stops = [f for f in self.fired.values() if f.event.action is Action.STOP]
        return min(stops, key=lambda f: (f.event.position, f.order)).event if stops else None

    def forget_after(self, position: int) -> None:
        """Drop firings after `position` (before re-running a pass whose later positions were stale)."""
        for cid in [cid for cid, f in self.fired.items() if f.event.position > position]:
            del self.fired[cid]
            self._reported.discard(cid)

    def may_fire(self, condition_id: str, lo: int, hi: int, prompt_len: int) -> bool:
        """Whether an unfired condition could fire at a position in [lo, hi)."""
        cond = self._condition_by_id.get(condition_id)
        if cond is None or condition_id in self.fired:
            return False
        start, end = scope_interval(cond.positions, prompt_len)
        return max(start, lo) < (hi if end is None else min(end, hi))

    def chunk(self, offset: int, length: int, prompt_len: int, *, splice_keep: Tensor | None = None) -> Chunk:
        """The hooks for one forward pass over positions [offset, offset + length) of one sequence."""
        return Chunk(self, offset, length, prompt_len, splice_keep)


class Chunk:
    """One forward pass of a plan: its write hooks, the codes it kept, and whether it must be redone.

    Every hook call takes a tick, so the chunk knows whether an edit gated by a condition was applied
    before or after the condition fired in this pass.
    """

    def __init__(self, plan: EditPlan, offset: int, length: int, prompt_len: int,
                 splice_keep: Tensor | None) -> None:
        self.plan, self.offset, self.length, self.prompt_len = plan, offset, length, prompt_len
        self.splice_keep = splice_keep  # (length,) bool: positions a splice replaces
        self.codes: dict[int, KeptCodes] = {}
        self._ticks = itertools.count()
        self._gated_ticks: dict[str, int] = {}  # condition id -> first tick an edit it gates was evaluated
        self.writes = self._build_writes()

    # ------------------------------------------------------------------------------------ planning

    def _relative(self, start: int, end: int | None) -> tuple[int, int] | None:
        """[start, end) in absolute positions, clipped to this pass and made chunk-relative; None if empty."""
        stop = self.offset + self.length if end is None else min(end, self.offset + self.length)
        a, b = max(start, self.offset) - self.offset, stop - self.offset
        return (a, b) if a < b else None

    def _span(self, positions: Positions, condition_id: str = "") -> tuple[int, int] | None:
        """The chunk-relative [a, b) where an edit or condition applies now, or None."""
        start, end = scope_interval(positions, self.prompt_len)
        enabled = self.plan.enabled_from(condition_id)
        return None if enabled is None else self._relative(max(start, enabled), end)

    def _gate_open(self, condition_id: str) -> bool:
        """Whether gated edits may apply in this pass: fired already, or could fire before its last position."""
        end = self.offset + self.length
        return self.plan.enabled_from(condition_id) is not None or (
            self.plan.may_fire(condition_id, self.offset, end - 1, self.prompt_len))

    def _may_act(self, positions: Positions, condition_id: str) -> bool:
        if not self._gate_open(condition_id):
            return False
        return self._relative(*scope_interval(positions, self.prompt_len)) is not None

    def _keep_span(self, index: int) -> tuple[int, int] | None:
        if index not in self.plan.decompose:
            return None
        a = max(self.plan.keep_from, self.offset) - self.offset
        return (a, self.length) if a < self.length else None

    def _stages_needed(self) -> list[int]:
        plan = self.plan
        needed = set(plan.splice)
        for index, conds in plan.conditions.items():
            if any(self._span(c.positions) and c.id not in plan.fired for _, c in conds):
                needed.add(index)
        for index, specs in plan.interventions.items():
            if any(self._may_act(s.positions, s.condition_id) for s in specs):
                needed.add(index)
        needed.update(i for i in plan.decompose if self._keep_span(i))
        return sorted(needed)

    def _build_writes(self) -> dict[str, ActivationEdit]:
        plan = self.plan
        stages = self._stages_needed()
        writes: dict[str, ActivationEdit] = {}
        if stages and plan.runtime is not None:
            writes = plan.runtime.new_pass(self._stage, stages).writes()
        for hookpoint, vectors in plan.steering.items():
            if not any(self._may_act(spec.positions, spec.condition_id) for spec, _ in vectors):
                continue
            steer = partial(self._steer, hookpoint)
            stage_edit = writes.get(hookpoint)
            writes[hookpoint] = steer if stage_edit is None else _then(steer, stage_edit)
        return writes

    def rerun_from(self) -> int | None:
        """The position after which this pass is stale, or None: an ENABLE condition fired at p before the
        last position, and an edit it gates had already run earlier in the pass."""
        end = self.offset + self.length
        stale = [f.event.position for cid, f in self.plan.fired.items()
                 if f.source is self and f.event.action is Action.ENABLE_INTERVENTIONS
                 and f.event.position < end - 1 and self._gated_ticks.get(cid, f.tick) < f.tick]
        return min(stale) if stale else None

    # ------------------------------------------------------------------------------------- handlers

    def _steer(self, hookpoint: str, h: Tensor) -> Tensor:  # h: (B, T, d)
        tick = next(self._ticks)
        out = h
        for spec, vector in self.plan.steering[hookpoint]:
            if spec.condition_id:
                self._gated_ticks.setdefault(spec.condition_id, tick)
            span = self._span(spec.positions, spec.condition_id)
            if span is None:
                continue
            if out is h:
                out = h.clone()
            out[:, span[0]:span[1]] += vector.to(out.dtype)
        return out

    def _stage(self, stage: RuntimeStage, h: Tensor, prev: Tensor | None) -> Tensor:
        """Encode what arrives, test conditions, edit, keep codes, splice: what flows on, (1, T, d)."""
        if h.shape[0] != 1:
            raise ValueError(f"an edit plan runs one sequence per pass, got a batch of {h.shape[0]}")
        runtime = self.plan.runtime
        assert runtime is not None
        tick = next(self._ticks)
        keep = self._keep_span(stage.index)
        result = runtime.run_stage(stage, h, prev) if keep and self.plan.include_error else None
        z = result.codes if result is not None else runtime.encode(stage, h, prev)  # (T, d_sae)
        self._test_conditions(stage.index, z, tick)
        z_new = self._edit_codes(stage.index, z, tick)
        if z_new is not None and torch.equal(z_new, z):
            z_new = None
        out = h if z_new is None else h + runtime.edit_delta(stage, z, z_new).reshape(h.shape).to(h.dtype)
        codes = z if z_new is None else z_new
        if keep:
            self._keep(stage, keep, codes, result, h, prev)
        if stage.index in self.plan.splice:
            out = self._splice(stage, codes, out, prev)
        return out

    def _keep(self, stage: RuntimeStage, span: tuple[int, int], codes: Tensor, result: StageResult | None,
              h: Tensor, prev: Tensor | None) -> None:
        """Keep the (edited) codes, the error norm and the predicted error norm of what arrived, (1, T, d)."""
        a, b = span
        error = result.error_norm()[a:b] if result is not None else None  # (n,)
        predicted = None
        if self.plan.predict_error is not None:
            predicted = self.plan.predict_error(stage, h[0, a:b], None if prev is None else prev[0, a:b])
        self.codes[stage.index] = KeptCodes(self.offset + a, codes[a:b], error, predicted)

    def _test_conditions(self, index: int, z: Tensor, tick: int) -> None:  # z: (T, d_sae)
        probes = []
        for order, cond in self.plan.conditions.get(index, ()):
            span = None if cond.id in self.plan.fired else self._span(cond.positions)
            if span is None:
                continue
            column = z[span[0]:span[1], cond.feature]  # (n,)
            hit = column > cond.threshold if cond.comparison is Comparison.ABOVE else column < cond.threshold
            first = hit.to(torch.uint8).argmax()
            found = torch.stack([hit.any().float(), first.float(), column[first].float()])  # (3,)
            probes.append((order, cond, span[0], found))
        if not probes:
            return
        found = torch.stack([p[3] for p in probes]).tolist()  # one device-to-host copy
        for (order, cond, a, _), (hit, first, value) in zip(probes, found, strict=True):
            if hit:
                self.plan.fire(order, cond, self.offset + a + int(first), value, tick, self)

    def _edit_codes(self, index: int, z: Tensor, tick: int) -> Tensor | None:  # z: (T, d_sae)
        z_new = None
        for spec in self.plan.interventions.get(index, ()):
            if spec.condition_id:
                self._gated_ticks.setdefault(spec.condition_id, tick)
            span = self._span(spec.positions, spec.condition_id)
            if span is None:
                continue
            if z_new is None:
                z_new = z.clone()
            apply_op(z_new[span[0]:span[1], spec.feature], spec)
        return z_new

    def _splice(self, stage: RuntimeStage, codes: Tensor, h: Tensor, prev: Tensor | None) -> Tensor:
        """Replace h by the reconstruction of `codes` at the positions `splice_keep` marks."""
        runtime = self.plan.runtime
        assert runtime is not None
        recon = runtime.to_activation(stage, stage.sae.decode(codes), prev).reshape(h.shape).to(h.dtype)
        if self.splice_keep is None:
            return recon
        return torch.where(self.splice_keep.to(h.device)[None, :, None], recon, h)


def _then(first: ActivationEdit, second: ActivationEdit) -> ActivationEdit:
    def edit(h: Tensor) -> Tensor:
        return second(first(h))

    return edit
