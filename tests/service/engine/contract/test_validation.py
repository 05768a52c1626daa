"""RequestValidator: every malformed field gets its error class and a message naming the field and the
allowed range; well-formed values become the expected specs."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from core.errors import FailedPrecondition, InvalidRequest, NotFound
from core.host.host_model import HostModel
from core.sae import SAEConfig, build_sae
from core.stack.affine import AffineMap
from core.stack.identity import HostModelIdentity
from core.stack.writer import StageSpec, write_stack
from service.config import ServerConfig
from service.engine.contract.inputs import (
    DEFAULT_CHUNK_TOKENS,
    MAX_CHUNK_TOKENS,
    ConditionIn,
    DecomposeOptionsIn,
    InputIn,
    InterventionIn,
    PositionsIn,
    SamplingIn,
    SteeringIn,
)
from service.engine.contract.specs import Action, Comparison, Op, Positions, Scope
from service.engine.contract.validation import RequestValidator
from service.engine.stacks.served import ServedStack, load_served_stack

CONFIG = ServerConfig(max_new_tokens=100, max_prompt_tokens=40, max_top_k=16, max_interventions=3)
IDS = InputIn(token_ids=(2, 10, 11, 12))
S0 = "blocks.1.hook_resid_post"  # stage 0: 96 features
D_SAE = (96, 48, 64)


def _sae(architecture: str, d_sae: int, seed: int):
    torch.manual_seed(seed)
    return build_sae(SAEConfig(architecture=architecture, d_in=64, d_sae=d_sae, k=4)).eval()


def build_stacks(host: HostModel, root: Path) -> dict[str, ServedStack]:
    """Two stacks on the tiny Gemma (d_model 64): "test" (a plain, a signed and a residual stage) and "other"."""
    identity = HostModelIdentity.from_model(host.model, host.name)
    affine = AffineMap(torch.eye(64), torch.zeros(64), 0.1, 0.9, 2.5)
    stages = [
        StageSpec(_sae("relu", D_SAE[0], 0), S0, 1.5,
                  metrics={"fve": 0.8, "l0": 12, "passed": True, "note": "text", "splice": {"ce": 1.25}}),
        StageSpec(_sae("sa_gsae", D_SAE[1], 1), "blocks.2.hook_mlp_out", name="mlp2", extras={"top_examples": []},
                  extra_tensors={"density": torch.rand(D_SAE[1])}),
        StageSpec(_sae("topk", D_SAE[2], 2), "blocks.3.hook_resid_post", 2.5, name="resid3", residual_of=0,
                  affine=affine),
    ]
    first = write_stack(root / "stack-a", "test", identity, stages)
    other = write_stack(root / "stack-b", "other", identity, [StageSpec(_sae("relu", 32, 3), S0)])
    return {s.name: s for s in (load_served_stack(p, host, self_check=False) for p in (first, other))}


@pytest.fixture(scope="module")
def stacks(tiny_gemma: HostModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ServedStack]:
    return build_stacks(tiny_gemma, tmp_path_factory.mktemp("stacks"))


@pytest.fixture(scope="module")
def v(tiny_gemma: HostModel, stacks) -> RequestValidator:
    return RequestValidator(tiny_gemma, stacks, CONFIG.limits())


def fails(error: type[Exception], call, *fragments: str) -> str:
    """Assert `call()` raises exactly `error` with every fragment in its message."""
    with pytest.raises(error) as info:
        call()
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"
    return str(info.value)


def edit(**kw) -> InterventionIn:
    return InterventionIn(**({"stage": S0, "feature": 5, "op": Op.ADD, "value": 1.0} | kw))


def cond(**kw) -> ConditionIn:
    base = {"id": "c", "stage": "mlp2", "feature": 3, "comparison": Comparison.ABOVE, "threshold": 0.5,
            "action": Action.ENABLE_INTERVENTIONS}
    return ConditionIn(**(base | kw))


def vector(**kw) -> SteeringIn:
    return SteeringIn(**({"hookpoint": "blocks.0.hook_resid_post", "values": [0.1] * 64} | kw))


# ----------------------------------------------------------------------------------------- stacks, stages


def test_stack_names_resolve_and_unknown_or_missing_stacks_are_refused(v, tiny_gemma):
    assert v.decompose("", IDS, None).stack == "test"  # "" = first loaded
    assert v.decompose("other", IDS, None).stack == "other"
    fails(NotFound, lambda: v.decompose("nope", IDS, None), "stack 'nope' is not loaded", "'test', 'other'")
    empty = RequestValidator(tiny_gemma, {}, CONFIG.limits())
    fails(FailedPrecondition, lambda: empty.decompose("", IDS, None), "Decompose needs an SAE stack")
    fails(FailedPrecondition, lambda: empty.get_feature("", S0, 1, 0), "GetFeature")
    fails(FailedPrecondition, lambda: empty.generate("", IDS, None, [edit()]), "interventions")
    fails(FailedPrecondition, lambda: empty.score("", IDS, splice_stages=[S0]), "splice_stages")
    fails(NotFound, lambda: empty.generate("test", IDS, None), "loaded stacks: none")
    plain = empty.generate("", IDS, None, steering=[vector()])  # steering needs no stack
    assert plain.stack == "" and len(plain.steering) == 1
    assert empty.score("", IDS).stack == ""


def test_stage_lists_resolve_in_forward_order_and_bad_names_are_named(v):
    assert v.decompose("", IDS, None).stages == (0, 1, 2)
    assert v.decompose("", IDS, DecomposeOptionsIn(stages=["resid3", S0])).stages == (0, 2)
    fails(NotFound, lambda: v.decompose("", IDS, DecomposeOptionsIn(stages=[S0, "zz"])),
          "options.stages[1] 'zz' is not a stage of stack 'test'", "'mlp2'")
    fails(InvalidRequest, lambda: v.decompose("", IDS, DecomposeOptionsIn(stages=["mlp2", "mlp2"])),
          "options.stages[1] 'mlp2' repeats options.stages[0]")
    fails(InvalidRequest, lambda: v.decompose("", IDS, DecomposeOptionsIn(stages=[""])),
          "options.stages[0] is required")
    assert v.score("", IDS, splice_stages=["resid3", "mlp2"]).splice_stages == (1, 2)
    fails(NotFound, lambda: v.score("", IDS, splice_stages=["x"]), "splice_stages[0] 'x'")


def test_feature_ids_out_of_range_name_the_field_and_the_range(v):
    message = fails(NotFound, lambda: v.generate("", IDS, None, [edit(), edit(), edit(feature=96)]),
                    "interventions[2].feature 96 is out of range", f"stage {S0!r} has 96 features (0..95)")
    assert "interventions[2]" in message
    fails(NotFound, lambda: v.generate("", IDS, None, conditions=[cond(feature=48)]), "conditions[0].feature 48",
          "(0..47)")
    fails(NotFound, lambda: v.get_feature("", "resid3", 64, 0), "feature 64 is out of range", "(0..63)")
    assert v.get_feature("", "resid3", 63, 0)[1:] == (2, 63, 10)


# ----------------------------------------------------------------------------------------- scalars


def test_top_k_defaults_and_is_capped(v):
    assert v.decompose("", IDS, DecomposeOptionsIn(top_k=0)).top_k == v.limits.default_top_k == 16
    assert v.decompose("", IDS, DecomposeOptionsIn(top_k=7)).top_k == 7
    fails(InvalidRequest, lambda: v.decompose("", IDS, DecomposeOptionsIn(top_k=17)), "options.top_k 17", "1..16")
    fails(InvalidRequest, lambda: v.decompose("", IDS, DecomposeOptionsIn(top_k=-1)), "options.top_k -1")
    fails(InvalidRequest, lambda: v.generate("", IDS, None, decompose=DecomposeOptionsIn(top_k=99)), "decompose.top_k")


def test_inputs_need_exactly_one_source_within_the_limits(v, tiny_gemma):
    fails(InvalidRequest, lambda: v.decompose("", None, None), "input is required")
    fails(InvalidRequest, lambda: v.decompose("", InputIn(), None), "input is required")
    fails(InvalidRequest, lambda: v.decompose("", InputIn(text="a", token_ids=(1,)), None), "exactly one")
    fails(InvalidRequest, lambda: v.decompose("", InputIn(text=""), None), "input.text is empty")
    fails(InvalidRequest, lambda: v.decompose("", InputIn(token_ids=()), None), "input.token_ids has 0 tokens")
    fails(InvalidRequest, lambda: v.generate("", InputIn(token_ids=(1, 512, 3)), None),
          "prompt.token_ids[1] 512 is out of range", "0..511")
    fails(InvalidRequest, lambda: v.decompose("", InputIn(token_ids=(1,) * 41), None), "has 41 tokens", "at most 40")
    fails(InvalidRequest, lambda: v.decompose("", InputIn(text="word " * 60), None), "input.text has", "at most 40")
    fails(InvalidRequest, lambda: v.decompose("", InputIn(text="x" * 5000), None), "characters")
    fails(InvalidRequest, lambda: v.score("", InputIn(token_ids=(5,))), "input.token_ids has 1 tokens", "at least 2")
    with_bos = v.decompose("", InputIn(text="hello world"), None).token_ids
    without = v.decompose("", InputIn(text="hello world", add_special_tokens=False), None).token_ids
    assert with_bos == tuple(tiny_gemma.tokenizer("hello world").input_ids) and with_bos[1:] == without
    assert v.decompose("", IDS, None).token_ids == (2, 10, 11, 12)


def test_sampling_defaults_and_bounds(v):
    s = v.generate("", IDS, None).sampling
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.stop) == (64, 0.0, 1.0, 0, ())
    assert 0 <= s.seed < 2**63 and v.generate("", IDS, SamplingIn(seed=7)).sampling.seed == 7
    ok = v.generate("", IDS, SamplingIn(max_new_tokens=100, temperature=0.7, top_p=0.9, top_k=512, stop=["."],
                                        ignore_eos=True)).sampling
    assert (ok.max_new_tokens, ok.temperature, ok.top_p, ok.top_k, ok.stop, ok.ignore_eos) == (
        100, pytest.approx(0.7), pytest.approx(0.9), 512, (".",), True)
    bad = {
        "max_new_tokens": (101, "sampling.max_new_tokens 101 exceeds the server's limit of 100"),
        "temperature": (-0.1, "sampling.temperature -0.1 is out of range"),
        "top_p": (1.5, "sampling.top_p 1.5 is out of range: (0, 1]"),
        "top_k": (513, "sampling.top_k 513 is out of range: 0..512"),
        "seed": (2**64, "sampling.seed"),
        "stop": ([""], "sampling.stop[0] has 0 characters"),
    }
    for name, (value, message) in bad.items():
        fails(InvalidRequest, lambda n=name, x=value: v.generate("", IDS, SamplingIn(**{n: x})), message)
    fails(InvalidRequest, lambda: v.generate("", IDS, SamplingIn(temperature=11)), "0..10")
    fails(InvalidRequest, lambda: v.generate("", IDS, SamplingIn(stop=["a"] * 17)), "sampling.stop has 17", "16")
    fails(InvalidRequest, lambda: v.generate("", IDS, SamplingIn(stop=["a" * 257])), "sampling.stop[0]", "1..256")
    for name in ("temperature", "top_p"):
        for value in (math.nan, math.inf):
            fails(InvalidRequest, lambda n=name, x=value: v.generate("", IDS, SamplingIn(**{n: x})),
                  f"sampling.{name} must be a finite number")


# ----------------------------------------------------------------------------------------- edits


def test_interventions_convert_and_every_bad_field_is_named(v):
    spec = v.generate("", IDS, None, [edit(stage="mlp2", feature=4, op=Op.CLAMP, lo=-1, hi=2,
                                           positions=PositionsIn(Scope.RANGE, 3, 0))]).interventions[0]
    assert (spec.stage, spec.feature, spec.op, spec.lo, spec.hi) == (1, 4, Op.CLAMP, -1.0, 2.0)
    assert spec.positions == Positions(Scope.RANGE, 3, None) and spec.condition_id == ""
    assert v.generate("", IDS, None, [edit()]).interventions[0].positions == Positions(Scope.ALL)
    fails(InvalidRequest, lambda: v.generate("", IDS, None, [edit(op=None)]), "interventions[0].op is required",
          "ADD, SET, SCALE, CLAMP, ABLATE")
    fails(InvalidRequest, lambda: v.generate("", IDS, None, [edit(op=Op.CLAMP, lo=2, hi=1)]),
          "interventions[0]: CLAMP needs lo <= hi")
    for name in ("value", "lo", "hi"):
        for value in (math.nan, -math.inf):
            fails(InvalidRequest, lambda n=name, x=value: v.generate("", IDS, None, [edit(), edit(**{n: x})]),
                  f"interventions[1].{name} must be a finite number")
    fails(NotFound, lambda: v.generate("", IDS, None, [edit(stage="nope")]), "interventions[0].stage 'nope'")
    fails(InvalidRequest, lambda: v.generate("", IDS, None, [edit(stage="")]), "interventions[0].stage is required")
    fails(InvalidRequest, lambda: v.generate("", IDS, None, [edit()] * 4), "interventions has 4 entries", "at most 3")


def test_positions_rules(v):
    def at(p: PositionsIn):
        return v.generate("", IDS, None, [edit(positions=p)]).interventions[0].positions

    assert at(PositionsIn(Scope.PROMPT)) == Positions(Scope.PROMPT)
    assert at(PositionsIn(None)) == Positions(Scope.ALL)
    assert at(PositionsIn(Scope.RANGE, 2, 5)) == Positions(Scope.RANGE, 2, 5)
    fails(InvalidRequest, lambda: at(PositionsIn(Scope.RANGE, 5, 5)),
          "interventions[0].positions.end 5 must be > start 5")
    fails(InvalidRequest, lambda: at(PositionsIn(Scope.RANGE, 140, 0)), "positions.start 140 is beyond", "0..139")
    fails(InvalidRequest, lambda: at(PositionsIn(None, 3, 0)), "apply only to scope RANGE")
    fails(InvalidRequest, lambda: at(PositionsIn(Scope.PROMPT, 0, 4)), "apply only to scope RANGE")
    condition = v.generate("", IDS, None, conditions=[cond()]).conditions[0]
    assert condition.positions == Positions(Scope.GENERATED)  # the condition default
    fails(InvalidRequest, lambda: v.score("", IDS, [edit(positions=PositionsIn(Scope.GENERATED))]),
          "interventions[0].positions.scope GENERATED is not valid in Score")
    fails(InvalidRequest, lambda: v.score("", IDS, steering=[vector(positions=PositionsIn(Scope.GENERATED))]),
          "steering_vectors[0].positions.scope")
    scored = v.score("", IDS, [edit(positions=PositionsIn(Scope.PROMPT))])
    assert scored.interventions[0].positions.scope is Scope.PROMPT


def test_conditions_and_their_references(v):
    spec = v.generate("", IDS, None, [edit(condition_id="c")], [vector(condition_id="c")],
                      [cond(), cond(id="halt", action=Action.STOP, comparison=Comparison.BELOW, threshold=-1)])
    assert [c.id for c in spec.conditions] == ["c", "halt"]
    assert spec.conditions[1].stage == 1 and spec.conditions[1].comparison is Comparison.BELOW
    assert spec.interventions[0].condition_id == spec.steering[0].condition_id == "c"
    gen = v.generate
    fails(InvalidRequest, lambda: gen("", IDS, None, conditions=[cond(id="")]), "conditions[0].id must have 1..64")
    fails(InvalidRequest, lambda: gen("", IDS, None, conditions=[cond(id="x" * 65)]), "conditions[0].id")
    fails(InvalidRequest, lambda: gen("", IDS, None, conditions=[cond(), cond()]),
          "conditions[1].id 'c' repeats conditions[0].id")
    fails(InvalidRequest, lambda: gen("", IDS, None, conditions=[cond(comparison=None)]),
          "conditions[0].comparison is required", "ABOVE, BELOW")
    fails(InvalidRequest, lambda: gen("", IDS, None, conditions=[cond(action=None)]),
          "conditions[0].action is required", "ENABLE_INTERVENTIONS, STOP")
    fails(InvalidRequest, lambda: gen("", IDS, None, conditions=[cond(threshold=math.nan)]),
          "conditions[0].threshold must be a finite number")
    fails(NotFound, lambda: gen("", IDS, None, conditions=[cond(stage="zz")]), "conditions[0].stage 'zz'")
    fails(InvalidRequest, lambda: gen("", IDS, None, conditions=[cond(id=str(i)) for i in range(4)]),
          "conditions has 4 entries")
    fails(InvalidRequest, lambda: gen("", IDS, None, [edit(condition_id="nope")], conditions=[cond()]),
          "interventions[0].condition_id 'nope' names no condition", "'c'")
    fails(InvalidRequest, lambda: gen("", IDS, None, steering=[vector(condition_id="h")],
                                      conditions=[cond(id="h", action=Action.STOP)]),
          "steering_vectors[0].condition_id 'h' names a condition whose action is STOP")
    fails(InvalidRequest, lambda: v.score("", IDS, [edit(condition_id="c")]),
          "interventions[0].condition_id is not valid in Score")


def test_steering_vectors(v):
    spec = v.generate("", IDS, None, steering=[vector(scale=0.5)]).steering[0]
    assert spec.hookpoint == "blocks.0.hook_resid_post" and len(spec.vector) == 64 and spec.scale == 0.5
    assert v.generate("", IDS, None, steering=[vector()]).steering[0].scale == 1.0  # unset = 1
    fails(NotFound, lambda: v.generate("", IDS, None, steering=[vector(hookpoint="blocks.9.hook_resid_post")]),
          "steering_vectors[0].hookpoint", "layer 9 > 3")
    fails(InvalidRequest, lambda: v.generate("", IDS, None, steering=[vector(hookpoint="")]), "is required")
    fails(InvalidRequest, lambda: v.generate("", IDS, None, steering=[vector(values=[1.0] * 63)]),
          "steering_vectors[0].values has 63 values", "width d=64")
    fails(InvalidRequest, lambda: v.generate("", IDS, None, steering=[vector(values=[0.0] * 10 + [math.inf] * 54)]),
          "steering_vectors[0].values[10] must be a finite number")
    fails(InvalidRequest, lambda: v.generate("", IDS, None, steering=[vector(scale=math.nan)]),
          "steering_vectors[0].scale must be a finite number")
    fails(InvalidRequest, lambda: v.score("", IDS, steering=[vector()] * 4), "steering_vectors has 4 entries")


# ----------------------------------------------------------------------------------------- requests


def test_decompose_feature_filter_and_chunks(v):
    spec = v.decompose("", IDS, DecomposeOptionsIn(stages=[S0, "mlp2"], include_error=True,
                                                   feature_filter=[("mlp2", [3, 1]), ("mlp2", [1, 7])]))
    assert spec.feature_filter == {1: (3, 1, 7)} and spec.include_error
    assert spec.chunk_tokens == DEFAULT_CHUNK_TOKENS
    assert v.decompose("", IDS, None, chunk_tokens=5).chunk_tokens == 5
    assert v.decompose("", IDS, None, chunk_tokens=10**6).chunk_tokens == MAX_CHUNK_TOKENS  # a hint: capped
    fails(InvalidRequest, lambda: v.decompose("", IDS, DecomposeOptionsIn(stages=[S0], feature_filter=[("mlp2", [1])])),
          "options.feature_filter[0].stage 'mlp2' is not reported")
    fails(NotFound, lambda: v.decompose("", IDS, DecomposeOptionsIn(feature_filter=[(S0, [1, 96])])),
          "options.feature_filter[0].ids[1] 96 is out of range")
    fails(InvalidRequest, lambda: v.decompose("", IDS, DecomposeOptionsIn(feature_filter=[(S0, range(17))])),
          "options.feature_filter[0].ids: 17 ids", "at most 16")


def test_generate_with_decompose_and_default_branch(v):
    spec = v.generate("other", InputIn(text="hi"), SamplingIn(max_new_tokens=3), decompose=DecomposeOptionsIn(),
                      with_default=True)
    assert spec.stack == "other" and spec.with_default and spec.sampling.max_new_tokens == 3
    assert spec.decompose is not None and spec.decompose.stages == (0,) and spec.decompose.stack == "other"
    assert replace(spec, with_default=False).decompose == spec.decompose


def test_get_feature_and_tokenize(v):
    stack, stage, feature, top_n = v.get_feature("other", S0, 31, 100)
    assert (stack.name, stage, feature, top_n) == ("other", 0, 31, 100)
    fails(InvalidRequest, lambda: v.get_feature("", S0, 1, 101), "top_n 101 is out of range: 1..100")
    fails(InvalidRequest, lambda: v.get_feature("", "", 1, 0), "stage is required")
    fails(NotFound, lambda: v.get_feature("", "nope", 1, 0), "stage 'nope' is not a stage")
    assert v.tokenize("", None) == ("", True)
    assert v.tokenize("abc", False) == ("abc", False)
    fails(InvalidRequest, lambda: v.tokenize("x" * 5000, None), "text has 5000 characters")
