"""Check every request value against the loaded model, stacks and server limits, and build the specs.

Transport-free: `service/convert/requests.py` pulls plain values out of protobuf (enums mapped to the spec enums,
UNSPECIFIED -> None, unset messages -> None) into the `*In` records of `service/engine/contract/inputs.py`;
`RequestValidator` turns them into the specs of `service/engine/contract/specs.py`, so the engine never checks
anything twice. Every error
names the field as the proto spells it (`interventions[2].feature`) and the allowed range or choices:
InvalidRequest for a malformed value, NotFound for an unknown stack, stage or hookpoint name and for a
feature id >= d_sae (docs/api.md), FailedPrecondition when a request needs a stack and none is loaded.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from core.errors import FailedPrecondition, InvalidRequest, NotFound
from service.engine.contract.inputs import (
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_TOP_N,
    MAX_CHARS_PER_TOKEN,
    MAX_CHUNK_TOKENS,
    MAX_CONDITION_ID_CHARS,
    MAX_SEED,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    MAX_TOP_N,
    ConditionIn,
    DecomposeOptionsIn,
    InputIn,
    InterventionIn,
    Limits,
    PositionsIn,
    SamplingIn,
    SteeringIn,
)
from service.engine.contract.paging import PageSigner
from service.engine.contract.search_validation import FeatureQueryValidation
from service.engine.contract.specs import (
    Action,
    Comparison,
    ConditionSpec,
    DecomposeSpec,
    GenerateSpec,
    InterventionSpec,
    Op,
    Positions,
    SamplingSpec,
    Scope,
    ScoreSpec,
    SteeringSpec,
)

if TYPE_CHECKING:
    from core.host.host_model import HostModel
    from service.engine.stacks.served import ServedStack

FEATURE_OUT_OF_RANGE = NotFound  # docs/api.md and GetFeatureRequest.feature: NOT_FOUND for a feature id >= d_sae


def _finite(value: float, field: str) -> float:
    if not math.isfinite(value):
        raise InvalidRequest(f"{field} must be a finite number, got {value}")
    return float(value)


def _choices(enum: type) -> str:
    return ", ".join(member.name for member in enum)


def _listing(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _count(items: Sequence[object], bound: int, field: str, limit_name: str) -> None:
    if len(items) > bound:
        raise InvalidRequest(f"{field} has {len(items)} entries; at most {bound} (Limits.{limit_name})")


class RequestValidator(FeatureQueryValidation):
    """Validates requests against one host model, the loaded stacks (first = default) and the limits
    (SearchFeatures and ListFeatures: service/engine/contract/search_validation.py)."""

    def __init__(self, host: HostModel, stacks: Mapping[str, ServedStack], limits: Limits,
                 pages: PageSigner | None = None) -> None:
        self.host = host
        self.stacks = stacks
        self.limits = limits
        self.vocab_size = int(host.model.config.vocab_size)
        self.pages = pages or PageSigner()

    # ---------------------------------------------------------------------------------------- names

    def stack(self, name: str, *, needed: bool = True, why: str = "this request") -> ServedStack | None:
        """The named stack, the default one for "", or None when no stack is loaded and none is needed."""
        if name:
            if name not in self.stacks:
                loaded = _listing(list(self.stacks)) if self.stacks else "none"
                raise NotFound(f"stack {name!r} is not loaded; loaded stacks: {loaded}")
            return self.stacks[name]
        if self.stacks:
            return next(iter(self.stacks.values()))
        if needed:
            raise FailedPrecondition(f"{why} needs an SAE stack, but this server has none loaded "
                                     "(start it with --stack DIR)")
        return None

    def stage(self, stack: ServedStack, name: str, field: str) -> int:
        names = stack.stage_names
        if not name:
            raise InvalidRequest(f"{field} is required: a stage name of stack {stack.name!r} ({_listing(names)})")
        if name not in names:
            raise NotFound(f"{field} {name!r} is not a stage of stack {stack.name!r}; stages: {_listing(names)}")
        return names.index(name)

    def stages(self, stack: ServedStack, names: Sequence[str], field: str) -> tuple[int, ...]:
        """Stage names -> ascending indices; empty = every stage; each name at most once."""
        if not names:
            return tuple(range(len(stack.stage_names)))
        indices: dict[int, int] = {}
        for i, name in enumerate(names):
            index = self.stage(stack, name, f"{field}[{i}]")
            if index in indices:
                raise InvalidRequest(f"{field}[{i}] {name!r} repeats {field}[{indices[index]}]; name each stage once")
            indices[index] = i
        return tuple(sorted(indices))

    def feature(self, stack: ServedStack, stage: int, feature: int, field: str) -> int:
        d_sae = stack.loaded.stages[stage].sae.cfg.d_sae
        if not 0 <= feature < d_sae:
            name = stack.stage_names[stage]
            raise FEATURE_OUT_OF_RANGE(f"{field} {feature} is out of range: stage {name!r} has {d_sae} features "
                                       f"(0..{d_sae - 1})")
        return int(feature)

    # ---------------------------------------------------------------------------------------- scalars

    def top_k(self, value: int, field: str) -> int:
        """0 = the default; 1..max_top_k."""
        if value == 0:
            return self.limits.default_top_k
        if not 0 < value <= self.limits.max_top_k:
            raise InvalidRequest(f"{field} {value} is out of range: 1..{self.limits.max_top_k} "
                                 "(Limits.max_top_k), or 0 for the default")
        return int(value)

    def positions(self, p: PositionsIn | None, default: Scope, field: str, *, score: bool = False) -> Positions:
        """Unset = `default`; start/end only with RANGE; end 0 = open, else > start."""
        scope = (p.scope if p is not None else None) or default
        if score and scope is Scope.GENERATED:
            raise InvalidRequest(f"{field}.scope GENERATED is not valid in Score (there are no generated tokens); "
                                 "use PROMPT, ALL or RANGE")
        if p is None:
            return Positions(scope)
        if scope is not Scope.RANGE:
            if p.start or p.end:
                raise InvalidRequest(f"{field}.start/end apply only to scope RANGE (scope is {scope.name}); "
                                     "set scope to RANGE or leave start and end 0")
            return Positions(scope)
        max_context = self.limits.max_context
        if not 0 <= p.start < max_context:
            raise InvalidRequest(f"{field}.start {p.start} is beyond the longest sequence this server runs "
                                 f"(positions 0..{max_context - 1})")
        if p.end and p.end <= p.start:
            raise InvalidRequest(f"{field}.end {p.end} must be > start {p.start}, or 0 for no end")
        return Positions(Scope.RANGE, int(p.start), int(p.end) or None)

    def input_ids(self, item: InputIn | None, field: str, *, min_tokens: int = 1) -> tuple[int, ...]:
        """Tokenize text or check token ids: min_tokens..max_prompt_tokens ids, each < vocab_size."""
        if item is None or (item.text is None and item.token_ids is None):
            raise InvalidRequest(f"{field} is required: set {field}.text or {field}.token_ids")
        if item.text is not None and item.token_ids is not None:
            raise InvalidRequest(f"{field}: set exactly one of text and token_ids")
        limit = self.limits.max_prompt_tokens
        if item.text is not None:
            where = f"{field}.text"
            if not item.text:
                raise InvalidRequest(f"{where} is empty; send at least one character")
            if len(item.text) > MAX_CHARS_PER_TOKEN * limit:
                raise InvalidRequest(f"{where} has {len(item.text)} characters; at most "
                                     f"{MAX_CHARS_PER_TOKEN * limit} (and {limit} tokens, Limits.max_prompt_tokens)")
            add = True if item.add_special_tokens is None else item.add_special_tokens
            ids = tuple(self.host.tokenizer(item.text, add_special_tokens=add).input_ids)
        else:
            where = f"{field}.token_ids"
            ids = tuple(int(i) for i in item.token_ids)
            bad = next((j for j, i in enumerate(ids) if not 0 <= i < self.vocab_size), None)
            if bad is not None:
                raise InvalidRequest(f"{where}[{bad}] {ids[bad]} is out of range: token ids are "
                                     f"0..{self.vocab_size - 1} (ModelInfo.vocab_size {self.vocab_size})")
        if len(ids) < min_tokens:
            raise InvalidRequest(f"{where} has {len(ids)} tokens; at least {min_tokens} needed")
        if len(ids) > limit:
            raise InvalidRequest(f"{where} has {len(ids)} tokens; at most {limit} (Limits.max_prompt_tokens)")
        return ids

    def sampling(self, s: SamplingIn | None, field: str = "sampling") -> SamplingSpec:
        s = s or SamplingIn()
        cap = self.limits.max_new_tokens
        if not 0 <= s.max_new_tokens <= cap:
            raise InvalidRequest(f"{field}.max_new_tokens {s.max_new_tokens} exceeds the server's limit of {cap} "
                                 "(Limits.max_new_tokens); 0 = the default")
        temperature = _finite(s.temperature, f"{field}.temperature")
        if not 0 <= temperature <= MAX_TEMPERATURE:
            raise InvalidRequest(f"{field}.temperature {temperature} is out of range: 0..{MAX_TEMPERATURE:g} "
                                 "(0 = greedy)")
        top_p = _finite(s.top_p, f"{field}.top_p") or 1.0
        if not 0 < top_p <= 1:
            raise InvalidRequest(f"{field}.top_p {top_p} is out of range: (0, 1], or 0 for no nucleus filter")
        if not 0 <= s.top_k <= self.vocab_size:
            raise InvalidRequest(f"{field}.top_k {s.top_k} is out of range: 0..{self.vocab_size} (0 = off)")
        if s.seed is not None and not 0 <= s.seed <= MAX_SEED:
            raise InvalidRequest(f"{field}.seed {s.seed} is out of range: 0..{MAX_SEED}")
        _count(s.stop, MAX_STOP_STRINGS, f"{field}.stop", "max_stop_strings")
        for i, stop in enumerate(s.stop):
            if not 0 < len(stop) <= MAX_STOP_CHARS:
                raise InvalidRequest(f"{field}.stop[{i}] has {len(stop)} characters; each stop string needs "
                                     f"1..{MAX_STOP_CHARS}")
        return SamplingSpec(
            max_new_tokens=int(s.max_new_tokens) or self.limits.default_max_new_tokens, temperature=temperature,
            top_p=top_p, top_k=int(s.top_k), seed=secrets.randbits(63) if s.seed is None else int(s.seed),
            stop=tuple(s.stop), ignore_eos=bool(s.ignore_eos),
        )

    # ---------------------------------------------------------------------------------------- edits

    def intervention(self, stack: ServedStack, item: InterventionIn, field: str, *,
                     conditions: Mapping[str, ConditionSpec], score: bool = False) -> InterventionSpec:
        stage = self.stage(stack, item.stage, f"{field}.stage")
        feature = self.feature(stack, stage, item.feature, f"{field}.feature")
        if item.op is None:
            raise InvalidRequest(f"{field}.op is required: one of {_choices(Op)}")
        value, lo, hi = (_finite(getattr(item, k), f"{field}.{k}") for k in ("value", "lo", "hi"))
        if item.op is Op.CLAMP and lo > hi:
            raise InvalidRequest(f"{field}: CLAMP needs lo <= hi, got lo {lo} > hi {hi}")
        positions = self.positions(item.positions, Scope.ALL, f"{field}.positions", score=score)
        condition_id = self._condition_ref(item.condition_id, f"{field}.condition_id", conditions, score)
        return InterventionSpec(stage, feature, item.op, value, lo, hi, positions, condition_id)

    def steering(self, item: SteeringIn, field: str, *, conditions: Mapping[str, ConditionSpec],
                 score: bool = False) -> SteeringSpec:
        if not item.hookpoint:
            raise InvalidRequest(f"{field}.hookpoint is required (a HookpointInfo.name such as "
                                 f"{self.host.hookpoints.names()[-1]!r})")
        try:
            point = self.host.hookpoints.get(item.hookpoint)
        except NotFound as exc:
            raise NotFound(f"{field}.hookpoint: {exc.message}") from None
        if len(item.values) != point.dim:
            raise InvalidRequest(f"{field}.values has {len(item.values)} values; hookpoint {point.name!r} "
                                 f"has width d={point.dim}")
        vector = tuple(float(v) for v in item.values)
        bad = next((j for j, v in enumerate(vector) if not math.isfinite(v)), None)
        if bad is not None:
            raise InvalidRequest(f"{field}.values[{bad}] must be a finite number, got {vector[bad]}")
        scale = 1.0 if item.scale is None else _finite(item.scale, f"{field}.scale")
        positions = self.positions(item.positions, Scope.ALL, f"{field}.positions", score=score)
        condition_id = self._condition_ref(item.condition_id, f"{field}.condition_id", conditions, score)
        return SteeringSpec(point.name, vector, scale, positions, condition_id)

    def conditions(self, stack: ServedStack, items: Sequence[ConditionIn],
                   field: str = "conditions") -> dict[str, ConditionSpec]:
        """id -> ConditionSpec, ids unique and 1..64 characters."""
        out: dict[str, ConditionSpec] = {}
        first: dict[str, int] = {}
        for i, c in enumerate(items):
            where = f"{field}[{i}]"
            if not 0 < len(c.id) <= MAX_CONDITION_ID_CHARS:
                raise InvalidRequest(f"{where}.id must have 1..{MAX_CONDITION_ID_CHARS} characters, got {len(c.id)}")
            if c.id in first:
                raise InvalidRequest(f"{where}.id {c.id!r} repeats {field}[{first[c.id]}].id; ids must be unique")
            first[c.id] = i
            stage = self.stage(stack, c.stage, f"{where}.stage")
            feature = self.feature(stack, stage, c.feature, f"{where}.feature")
            if c.comparison is None:
                raise InvalidRequest(f"{where}.comparison is required: one of {_choices(Comparison)}")
            threshold = _finite(c.threshold, f"{where}.threshold")
            if c.action is None:
                raise InvalidRequest(f"{where}.action is required: one of {_choices(Action)}")
            positions = self.positions(c.positions, Scope.GENERATED, f"{where}.positions")
            out[c.id] = ConditionSpec(c.id, stage, feature, c.comparison, threshold, c.action, positions)
        return out

    def _condition_ref(self, condition_id: str, field: str, conditions: Mapping[str, ConditionSpec],
                       score: bool) -> str:
        if not condition_id:
            return ""
        if score:
            raise InvalidRequest(f"{field} is not valid in Score (conditions exist only in Generate); leave it empty")
        condition = conditions.get(condition_id)
        if condition is None:
            known = _listing(list(conditions)) if conditions else "none"
            raise InvalidRequest(f"{field} {condition_id!r} names no condition of this request; conditions: {known}")
        if condition.action is not Action.ENABLE_INTERVENTIONS:
            raise InvalidRequest(f"{field} {condition_id!r} names a condition whose action is "
                                 f"{condition.action.name}; only ENABLE_INTERVENTIONS conditions enable edits")
        return condition_id

    # ---------------------------------------------------------------------------------------- requests

    def decompose_options(self, stack: ServedStack, opts: DecomposeOptionsIn | None, field: str, *,
                          token_ids: tuple[int, ...] = (), chunk_tokens: int = 0) -> DecomposeSpec:
        opts = opts or DecomposeOptionsIn()
        stages = self.stages(stack, opts.stages, f"{field}.stages")
        top_k = self.top_k(opts.top_k, f"{field}.top_k")
        always: dict[int, tuple[int, ...]] = {}
        for i, (name, ids) in enumerate(opts.feature_filter):
            where = f"{field}.feature_filter[{i}]"
            stage = self.stage(stack, name, f"{where}.stage")
            if stage not in stages:
                raise InvalidRequest(f"{where}.stage {name!r} is not reported; list it in {field}.stages too")
            merged = dict.fromkeys(always.get(stage, ()))
            merged.update(dict.fromkeys(self.feature(stack, stage, f, f"{where}.ids[{j}]") for j, f in enumerate(ids)))
            if len(merged) > self.limits.max_top_k:
                raise InvalidRequest(f"{where}.ids: {len(merged)} ids for stage {name!r}; at most "
                                     f"{self.limits.max_top_k} per stage (Limits.max_top_k)")
            always[stage] = tuple(merged)
        chunk = min(int(chunk_tokens), MAX_CHUNK_TOKENS) if chunk_tokens > 0 else DEFAULT_CHUNK_TOKENS
        return DecomposeSpec(stack.name, token_ids, stages, top_k, bool(opts.include_error), always, chunk)

    def decompose(self, stack: str, source: InputIn | None, options: DecomposeOptionsIn | None,
                  chunk_tokens: int = 0) -> DecomposeSpec:
        served = self.stack(stack, why="Decompose")
        spec = self.decompose_options(served, options, "options", chunk_tokens=chunk_tokens)
        return replace(spec, token_ids=self.input_ids(source, "input"))

    def generate(self, stack: str, prompt: InputIn | None, sampling: SamplingIn | None,
                 interventions: Sequence[InterventionIn] = (), steering: Sequence[SteeringIn] = (),
                 conditions: Sequence[ConditionIn] = (), decompose: DecomposeOptionsIn | None = None,
                 with_default: bool = False) -> GenerateSpec:
        _count(interventions, self.limits.max_interventions, "interventions", "max_interventions")
        _count(steering, self.limits.max_interventions, "steering_vectors", "max_interventions")
        _count(conditions, self.limits.max_conditions, "conditions", "max_conditions")
        needed = bool(interventions or conditions or decompose is not None)
        served = self.stack(stack, needed=needed, why="a Generate request with interventions, conditions or "
                                                       "decompose")
        sampling_spec = self.sampling(sampling)
        conds = self.conditions(served, conditions) if conditions else {}
        edits = tuple(self.intervention(served, x, f"interventions[{i}]", conditions=conds)
                      for i, x in enumerate(interventions))
        vectors = tuple(self.steering(x, f"steering_vectors[{i}]", conditions=conds) for i, x in enumerate(steering))
        features = self.decompose_options(served, decompose, "decompose") if decompose is not None else None
        return GenerateSpec(
            stack=served.name if served is not None else "", prompt_ids=self.input_ids(prompt, "prompt"),
            sampling=sampling_spec, interventions=edits, steering=vectors, conditions=tuple(conds.values()),
            decompose=features, with_default=bool(with_default),
        )

    def score(self, stack: str, source: InputIn | None, interventions: Sequence[InterventionIn] = (),
              steering: Sequence[SteeringIn] = (), splice_stages: Sequence[str] = ()) -> ScoreSpec:
        _count(interventions, self.limits.max_interventions, "interventions", "max_interventions")
        _count(steering, self.limits.max_interventions, "steering_vectors", "max_interventions")
        served = self.stack(stack, needed=bool(interventions or splice_stages),
                            why="a Score request with interventions or splice_stages")
        edits = tuple(self.intervention(served, x, f"interventions[{i}]", conditions={}, score=True)
                      for i, x in enumerate(interventions))
        vectors = tuple(self.steering(x, f"steering_vectors[{i}]", conditions={}, score=True)
                        for i, x in enumerate(steering))
        splice = self.stages(served, splice_stages, "splice_stages") if splice_stages else ()
        return ScoreSpec(stack=served.name if served is not None else "",
                         token_ids=self.input_ids(source, "input", min_tokens=2),
                         interventions=edits, steering=vectors, splice_stages=splice)

    def get_feature(self, stack: str, stage: str, feature: int, top_n: int) -> tuple[ServedStack, int, int, int]:
        """(stack, stage index, feature, top_n); top_n 0 = 10, at most MAX_TOP_N."""
        served = self.stack(stack, why="GetFeature")
        index = self.stage(served, stage, "stage")
        feature = self.feature(served, index, feature, "feature")
        if not 0 <= top_n <= MAX_TOP_N:
            raise InvalidRequest(f"top_n {top_n} is out of range: 1..{MAX_TOP_N} (Limits.max_top_n), or 0 for "
                                 f"{DEFAULT_TOP_N}")
        return served, index, feature, int(top_n) or DEFAULT_TOP_N

    def tokenize(self, text: str, add_special_tokens: bool | None) -> tuple[str, bool]:
        """Tokenize accepts empty text; it is bounded like any input text."""
        bound = MAX_CHARS_PER_TOKEN * self.limits.max_prompt_tokens
        if len(text) > bound:
            raise InvalidRequest(f"text has {len(text)} characters; at most {bound}")
        return text, True if add_special_tokens is None else bool(add_special_tokens)
