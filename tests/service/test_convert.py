"""service/convert/: protobuf requests become the expected specs (presence and enums kept, unknown enum
numbers refused by field), spec events become messages with packed feature arrays, and GetServerInfo
describes the tiny model completely."""

from __future__ import annotations

import math
import platform

import pytest
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import types_pb2 as t

import service
from core.errors import InvalidRequest
from core.stack.identity import model_fingerprint
from service.config import ServerConfig
from service.convert import info as describe
from service.convert import requests as to_spec
from service.convert import responses as to_proto
from service.engine.contract.specs import (
    Action,
    Branch,
    ConditionEvent,
    DecomposeChunk,
    DecomposeHeader,
    FeatureInfo,
    FinishEvent,
    FinishReason,
    GenerateHeader,
    Op,
    Positions,
    Scope,
    ScoreResult,
    StageCodes,
    TokenEvent,
    TokenFeatures,
    TokenScore,
)
from service.engine.contract.validation import RequestValidator
from tests.service.engine.contract.test_validation import CONFIG, S0, build_stacks, fails


@pytest.fixture(scope="module")
def stacks(tiny_gemma, tmp_path_factory):
    return build_stacks(tiny_gemma, tmp_path_factory.mktemp("stacks"))


@pytest.fixture(scope="module")
def v(tiny_gemma, stacks) -> RequestValidator:
    return RequestValidator(tiny_gemma, stacks, CONFIG.limits())


IDS = t.Input(token_ids=t.TokenIds(ids=[2, 10, 11, 12]))


# ------------------------------------------------------------------------------------------ requests


def test_decompose_request_converts(v, tiny_gemma):
    req = pb.DecomposeRequest(stack="other", input=IDS, chunk_tokens=8, options=t.DecomposeOptions(
        stages=[S0], top_k=3, include_error=True, feature_filter=[t.FeatureFilter(stage=S0, ids=[4, 9])]))
    spec = to_spec.decompose_spec(req, v)
    assert (spec.stack, spec.token_ids, spec.stages, spec.top_k, spec.include_error, spec.chunk_tokens) == (
        "other", (2, 10, 11, 12), (0,), 3, True, 8)
    assert spec.feature_filter == {0: (4, 9)}
    text = to_spec.decompose_spec(pb.DecomposeRequest(input=t.Input(text="hi there", add_special_tokens=False)), v)
    assert text.stack == "test" and text.stages == (0, 1, 2) and text.top_k == 16 and not text.include_error
    assert text.token_ids == tuple(tiny_gemma.tokenizer("hi there", add_special_tokens=False).input_ids)
    fails(InvalidRequest, lambda: to_spec.decompose_spec(pb.DecomposeRequest(), v), "input is required")
    fails(InvalidRequest, lambda: to_spec.decompose_spec(pb.DecomposeRequest(input=t.Input(text="")), v),
          "input.text is empty")


def test_generate_request_converts_with_presence_and_enums(v):
    req = pb.GenerateRequest(
        prompt=IDS, with_default=True,
        sampling=pb.SamplingParams(max_new_tokens=5, temperature=0.5, top_p=0.8, top_k=4, seed=0, stop=["\n"]),
        interventions=[
            t.Intervention(stage="mlp2", feature=7, op=t.INTERVENTION_OP_SET, value=8.0, condition_id="go",
                           positions=t.Positions(scope=t.POSITION_SCOPE_RANGE, start=4, end=9)),
            t.Intervention(stage=S0, feature=1, op=t.INTERVENTION_OP_CLAMP, lo=-1, hi=1,
                           positions=t.Positions()),  # present but UNSPECIFIED = ALL
        ],
        steering_vectors=[t.SteeringVector(hookpoint="blocks.1.hook_mlp_out", values=[0.5] * 64, scale=0.0)],
        conditions=[t.Condition(id="go", stage=S0, feature=2, comparison=t.COMPARISON_BELOW, threshold=-0.5,
                                action=t.CONDITION_ACTION_ENABLE_INTERVENTIONS,
                                positions=t.Positions(scope=t.POSITION_SCOPE_ALL))],
        decompose=t.DecomposeOptions(),  # set, empty = every stage, default top_k
    )
    spec = to_spec.generate_spec(req, v)
    s = spec.sampling
    assert (s.max_new_tokens, s.top_k, s.seed, s.stop) == (5, 4, 0, ("\n",))  # seed 0 set explicitly is kept
    assert s.temperature == pytest.approx(0.5) and s.top_p == pytest.approx(0.8)
    first, second = spec.interventions
    assert (first.stage, first.feature, first.op, first.value, first.condition_id) == (1, 7, Op.SET, 8.0, "go")
    assert first.positions == Positions(Scope.RANGE, 4, 9) and second.positions == Positions(Scope.ALL)
    assert (second.op, second.lo, second.hi) == (Op.CLAMP, -1.0, 1.0)
    assert spec.steering[0].scale == 0.0 and spec.steering[0].vector == (0.5,) * 64  # scale set to 0 is kept
    condition = spec.conditions[0]
    assert condition.positions == Positions(Scope.ALL) and condition.action is Action.ENABLE_INTERVENTIONS
    assert spec.decompose is not None and spec.decompose.stages == (0, 1, 2) and spec.with_default
    plain = to_spec.generate_spec(pb.GenerateRequest(prompt=IDS), v)
    assert plain.decompose is None and plain.sampling.max_new_tokens == 64 and plain.stack == "test"


@pytest.mark.parametrize(("build", "field"), [
    (lambda: pb.GenerateRequest(prompt=IDS, interventions=[t.Intervention(stage=S0, feature=1, op=99)]),
     "interventions[0].op has unknown value 99; valid: INTERVENTION_OP_ADD"),
    (lambda: pb.GenerateRequest(prompt=IDS, interventions=[t.Intervention(
        stage=S0, feature=1, op=1, positions=t.Positions(scope=7))]), "interventions[0].positions.scope has unknown"),
    (lambda: pb.GenerateRequest(prompt=IDS, steering_vectors=[t.SteeringVector(positions=t.Positions(scope=9))]),
     "steering_vectors[0].positions.scope has unknown value 9"),
    (lambda: pb.GenerateRequest(prompt=IDS, conditions=[t.Condition(id="a", comparison=3)]),
     "conditions[0].comparison has unknown value 3"),
    (lambda: pb.GenerateRequest(prompt=IDS, conditions=[t.Condition(id="a", comparison=1, action=42)]),
     "conditions[0].action has unknown value 42; valid: CONDITION_ACTION_ENABLE_INTERVENTIONS, CONDITION_ACTION_STOP"),
])
def test_unknown_enum_numbers_are_refused_naming_the_field(v, build, field):
    fails(InvalidRequest, lambda: to_spec.generate_spec(build(), v), field)


def test_unspecified_required_enums_are_refused(v):
    req = pb.GenerateRequest(prompt=IDS, interventions=[t.Intervention(stage=S0, feature=1)])
    fails(InvalidRequest, lambda: to_spec.generate_spec(req, v), "interventions[0].op is required")


def test_score_feature_and_tokenize_requests(v):
    req = pb.ScoreRequest(input=IDS, splice_stages=["resid3"], interventions=[
        t.Intervention(stage=S0, feature=3, op=t.INTERVENTION_OP_ABLATE)])
    spec = to_spec.score_spec(req, v)
    assert spec.splice_stages == (2,) and spec.interventions[0].op is Op.ABLATE and spec.token_ids == (2, 10, 11, 12)
    stack, stage, feature, top_n = to_spec.feature_request(pb.GetFeatureRequest(stage="mlp2", feature=47), v)
    assert (stack.name, stage, feature, top_n) == ("test", 1, 47, 10)
    assert to_spec.tokenize_request(pb.TokenizeRequest(text="a b"), v) == ("a b", True)
    assert to_spec.tokenize_request(pb.TokenizeRequest(text="a", add_special_tokens=False), v) == ("a", False)


# ------------------------------------------------------------------------------------------ responses


def _packed(msg: t.StageCodes) -> bool:
    """ids (field 2) and values (field 3) travel length-delimited (packed), not one tag per element."""
    wire = msg.SerializeToString()
    return b"\x12" in wire and b"\x1a" in wire and b"\x10" not in wire[2:4]


CODES = StageCodes(stage=1, ids=(4, 0, 7), values=(2.5, -1.0, 0.25), l0=5, error_norm=0.5)


def test_decompose_events_round_trip(stacks):
    stack = stacks["test"]
    header = to_proto.decompose_response(DecomposeHeader("test", stack.digest, (0, 1), 2, 3), stack)
    parsed = pb.DecomposeResponse.FromString(header.SerializeToString())
    assert parsed.WhichOneof("event") == "header" and parsed.header.top_k == 3 and parsed.header.num_tokens == 2
    assert [(r.index, r.name, r.hookpoint, r.d_sae, r.signed) for r in parsed.header.stages] == [
        (0, S0, S0, 96, False), (1, "mlp2", "blocks.2.hook_mlp_out", 48, True)]
    chunk = DecomposeChunk((TokenFeatures(0, 2, "<bos>", (CODES,)), TokenFeatures(1, 9, "a", ())))
    parsed = pb.DecomposeResponse.FromString(to_proto.decompose_response(chunk, stack).SerializeToString())
    first = parsed.chunk.tokens[0]
    assert (first.token.position, first.token.id, first.token.text) == (0, 2, "<bos>")
    codes = first.features[0]
    assert list(codes.ids) == [4, 0, 7] and list(codes.values) == [2.5, -1.0, 0.25] and codes.l0 == 5
    assert codes.HasField("error_norm") and not codes.HasField("predicted_error_norm")
    assert _packed(codes) and parsed.chunk.tokens[1].token.position == 1
    with pytest.raises(TypeError):
        to_proto.decompose_response(CODES, stack)  # type: ignore[arg-type]


def test_generate_events_round_trip(stacks):
    stack = stacks["test"]
    header = GenerateHeader("test", "d" * 64, (2,), ((2, "<bos>"), (9, "hi")), 7, 5, (Branch.STEERED, Branch.DEFAULT))
    msg = to_proto.generate_response(header, stack).header
    assert [(p.position, p.id, p.text) for p in msg.prompt] == [(0, 2, "<bos>"), (1, 9, "hi")]
    assert (msg.prompt_tokens, msg.seed, msg.max_new_tokens) == (2, 7, 5) and msg.stages[0].name == "resid3"
    assert list(msg.branches) == [t.BRANCH_STEERED, t.BRANCH_DEFAULT]
    token = to_proto.generate_response(TokenEvent(Branch.DEFAULT, 0, 2, 11, " x", -0.25, (CODES,)), stack).token
    assert (token.branch, token.index, token.position, token.token_id, token.text, token.logprob) == (
        t.BRANCH_DEFAULT, 0, 2, 11, " x", -0.25)
    assert list(token.features[0].ids) == [4, 0, 7]
    fired = ConditionEvent(Branch.STEERED, "halt", 1, 3, 4, 1.5, Action.STOP)
    condition = to_proto.generate_response(fired, stack).condition
    assert (condition.condition_id, condition.stage, condition.feature, condition.position, condition.value,
            condition.action) == ("halt", "mlp2", 3, 4, 1.5, t.CONDITION_ACTION_STOP)
    finish = to_proto.generate_response(FinishEvent(Branch.STEERED, FinishReason.FEATURE_CONDITION, 2, 3, "abc",
                                                   trigger=fired), stack).finish
    assert finish.reason == pb.FINISH_REASON_FEATURE_CONDITION and finish.trigger.stage == "mlp2"
    assert (finish.prompt_tokens, finish.generated_tokens, finish.text) == (2, 3, "abc")
    stop = to_proto.generate_response(FinishEvent(Branch.DEFAULT, FinishReason.STOP_STRING, 2, 1, "a.",
                                                 stop_string="."), None).finish
    assert stop.stop_string == "." and not stop.HasField("trigger") and stop.branch == t.BRANCH_DEFAULT
    bare = to_proto.generate_response(GenerateHeader("", "", (), ((2, ""),), 1, 4, (Branch.STEERED,)), None).header
    assert bare.stack == "" and not bare.stages


def test_score_and_feature_responses(stacks):
    result = ScoreResult((2, 5, 6), 2, 3.5, 3.75, 0.25, True, (3.0, 4.0), (3.5, 4.0), (0.5, 0.0))
    msg = pb.ScoreResponse.FromString(to_proto.score_response(result).SerializeToString())
    assert (msg.num_tokens, msg.scored_tokens, list(msg.token_ids), msg.clean_ce, msg.edited_ce, msg.kl) == (
        3, 2, [2, 5, 6], 3.5, 3.75, 0.25)
    assert msg.edited and list(msg.kl_per_token) == [0.5, 0.0] and list(msg.edited_ce_per_token) == [3.5, 4.0]
    info = FeatureInfo("test", 1, 7, 0.75, (TokenScore(5, "a", 2.0),), (TokenScore(6, "b", -1.0),),
                       top_examples=(("some text", 1, 3.5),))
    feature = to_proto.feature_response(info, stacks["test"])
    assert (feature.stack, feature.stage, feature.stage_index, feature.feature, feature.decoder_norm) == (
        "test", "mlp2", 1, 7, 0.75)
    assert feature.top_tokens[0].id == 5 and feature.bottom_tokens[0].score == -1.0
    assert not feature.HasField("density") and feature.top_examples[0].position == 1
    dense = to_proto.feature_response(FeatureInfo("test", 0, 1, 1.0, (), (), density=0.125), stacks["test"])
    assert dense.HasField("density") and dense.density == 0.125
    assert list(to_proto.tokenize_response([2, 9], ["<bos>", "a"]).tokens) == ["<bos>", "a"]


# ------------------------------------------------------------------------------------------ server info


def test_server_info_describes_the_tiny_model(tiny_gemma, stacks):
    config = ServerConfig(auth_token="secret-token", max_top_k=16)
    info = describe.server_info(tiny_gemma, list(stacks.values()), config, "full")
    info = pb.GetServerInfoResponse.FromString(info.SerializeToString())
    m = info.model
    assert (m.name, m.architecture, m.num_layers, m.d_model, m.vocab_size, m.dtype, m.device) == (
        "tiny-random", "gemma3_text", 4, 64, 512, "float32", "cpu")
    assert m.fingerprint == model_fingerprint(tiny_gemma.model)
    assert len(info.hookpoints) == 16 and info.hookpoints[0].name == "blocks.0.hook_resid_pre"
    last = info.hookpoints[-1]
    assert (last.name, last.layer, last.kind, last.d) == (
        "blocks.3.hook_resid_post", 3, pb.HOOKPOINT_KIND_RESID_POST, 64)
    assert [s.name for s in info.stacks] == ["test", "other"]
    test = info.stacks[0]
    assert test.digest == stacks["test"].digest and test.path == "stack-a" and test.host_model == "tiny-random"
    s0, s1, s2 = test.stages
    assert (s0.index, s0.name, s0.architecture, s0.d_in, s0.d_sae, s0.signed) == (0, S0, "relu", 64, 96, False)
    assert s0.input_scale == 1.5 and not s0.HasField("residual_of") and not s0.has_error_predictor
    assert dict(s0.metrics) == {"fve": 0.8, "l0": 12.0, "splice.ce": 1.25}  # numbers only, nested flattened
    assert s1.signed and s1.has_density and s1.has_top_examples and not s0.has_density
    assert s2.HasField("residual_of") and s2.residual_of == 0 and s2.input_scale == 2.5
    caps = info.capabilities
    assert caps.mode == pb.SERVING_MODE_FULL and caps.auth_required and caps.steering_vectors
    assert list(caps.rpcs) == ["GetServerInfo", "ListStacks", "GetFeature", "Tokenize", "Decompose", "Generate",
                               "Score", "SearchFeatures", "ListFeatures"]
    assert len(caps.intervention_ops) == 5 and len(caps.condition_actions) == 2 and caps.encode_backend == ""
    lim = info.limits
    assert (lim.max_new_tokens, lim.default_max_new_tokens, lim.max_prompt_tokens, lim.max_top_k,
            lim.default_top_k) == (512, 64, 2048, 16, 16)
    assert (lim.max_interventions, lim.max_conditions, lim.max_stop_strings, lim.max_top_n) == (64, 64, 16, 100)
    assert (lim.max_page_size, lim.default_page_size) == (200, 20)
    assert (lim.max_batch_vectors, lim.max_message_bytes, lim.queue_size) == (4096, 64 * 1024 * 1024, 64)
    ver = info.versions
    assert (ver.server, ver.api, ver.python) == (service.__version__, "v1", platform.python_version())
    assert ver.torch and ver.transformers and ver.grpc
    assert info.instance
    listed = describe.list_stacks_response(list(stacks.values()))
    assert [s.name for s in listed.stacks] == ["test", "other"] and listed.stacks[0] == test


def test_server_info_without_a_model(stacks):
    info = describe.server_info(None, [stacks["other"]], ServerConfig(), "activation_only", encode_backend="torch")
    assert not info.HasField("model") and not info.hookpoints and len(info.stacks) == 1
    caps = info.capabilities
    assert caps.mode == pb.SERVING_MODE_ACTIVATION_ONLY and not caps.auth_required and not caps.steering_vectors
    assert list(caps.rpcs) == ["GetServerInfo", "ListStacks", "EncodeActivations"] and caps.encode_backend == "torch"
    with pytest.raises(ValueError, match="serving mode"):
        describe.server_info(None, [], ServerConfig(), "turbo")


def test_metrics_keep_finite_numbers_only():
    assert describe.numeric_metrics({"a": 1, "b": True, "c": math.nan, "d": "x", "e": {"f": 2.5, "g": [1]}}) == {
        "a": 1.0, "e.f": 2.5}
