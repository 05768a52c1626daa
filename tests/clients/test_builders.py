"""Builders, request assembly, channel settings and retry backoff: no server needed."""

from __future__ import annotations

import json
import math
import random

import featurewire as fw
import pytest
from featurewire import Condition, DecomposeOptions, Intervention, Positions, RetryPolicy, Vector
from featurewire import _requests as rq
from featurewire._transport import channel_options, retry_policy
from featurewire.arrays import matrix
from featurewire.v1 import types_pb2 as t

S = "blocks.6.hook_resid_post"


def test_interventions_become_their_messages():
    assert Intervention.set(S, 3, 8).to_proto() == t.Intervention(stage=S, feature=3, op=t.INTERVENTION_OP_SET, value=8)
    add = Intervention.add(S, 3, -0.5, positions="generated").to_proto()
    assert add.op == t.INTERVENTION_OP_ADD and add.positions.scope == t.POSITION_SCOPE_GENERATED
    assert Intervention.scale(S, 3, 0.5).to_proto().value == 0.5
    clamp = Intervention.clamp(S, 3, lo=1.0).to_proto()
    assert clamp.op == t.INTERVENTION_OP_CLAMP and clamp.lo == 1.0 and math.isfinite(clamp.hi) and clamp.hi > 1e38
    ablate = Intervention.ablate(S, 3).at(Positions.range(2, 5)).to_proto()
    assert ablate.op == t.INTERVENTION_OP_ABLATE and (ablate.positions.start, ablate.positions.end) == (2, 5)
    assert not Intervention.set(S, 3, 1).to_proto().HasField("positions")  # the server's default, ALL
    with pytest.raises(ValueError, match="op must be"):
        Intervention(S, 3, "PIN")


@pytest.mark.parametrize(("text", "expected"), [
    ("prompt", Positions("PROMPT")), ("GENERATED", Positions("GENERATED")), ("all", Positions("ALL")),
    ("4", Positions("RANGE", 4, 5)), ("3:8", Positions("RANGE", 3, 8)), ("3:", Positions("RANGE", 3, None)),
])
def test_positions_parse(text, expected):
    assert Positions.parse(text) == expected
    message = expected.to_proto()
    assert message.end == (expected.end or 0)
    assert message.scope == t.PositionScope.Value(f"POSITION_SCOPE_{expected.scope}")


def test_positions_reject_nonsense():
    with pytest.raises(ValueError, match="positions"):
        Positions.parse("later")
    with pytest.raises(ValueError, match="scope"):
        Positions("SOMETIMES")


def test_conditions_stop_or_enable_their_edits():
    stop = Condition.above(S, 77, 2.5).stop()
    assert stop.id == f"{S}:77>2.5" and stop.to_proto().action == t.CONDITION_ACTION_STOP
    below = Condition.below(S, 5, -1, id="neg", positions="all")
    with pytest.raises(ValueError, match="no action"):
        below.to_proto()
    enable = below.enable(Intervention.set(S, 1, 4.0), Vector("blocks.2.hook_resid_post", [1.0, 2.0]))
    assert enable.to_proto().comparison == t.COMPARISON_BELOW and enable.to_proto().positions.scope == 3
    request = rq.generate("hi", stack="", interventions=[Intervention.ablate(S, 9)], conditions=[enable, stop],
                          decompose=True, with_default=True, add_special_tokens=None, options={"seed": 0}).request
    assert [i.condition_id for i in request.interventions] == ["", "neg"]
    assert [v.condition_id for v in request.steering_vectors] == ["neg"]
    assert [c.id for c in request.conditions] == ["neg", stop.id] and request.with_default
    assert request.HasField("decompose") and request.decompose.include_error and request.sampling.seed == 0


def test_generate_and_score_requests():
    request = rq.generate([2, 5, 7], stack="s", interventions=[], conditions=[], decompose=3, with_default=False,
                          add_special_tokens=None,
                          options={"max_new_tokens": 4, "temperature": 0.7, "stop": "\n", "top_k": 5}).request
    assert list(request.prompt.token_ids.ids) == [2, 5, 7] and request.decompose.top_k == 3
    assert request.sampling.stop == ["\n"] and not request.sampling.HasField("seed")
    with pytest.raises(TypeError, match="unknown sampling"):
        rq.sampling({"max_tokens": 3})
    with pytest.raises(ValueError, match="token ids"):
        rq.text_input([1, 2], add_special_tokens=False)
    assert rq.text_input("x", add_special_tokens=False).add_special_tokens is False
    score = rq.score("x y", stack="", interventions=[Vector("h", [1.0], scale=2)], splice="a",
                     add_special_tokens=None).request
    assert score.splice_stages == ["a"] and score.steering_vectors[0].scale == 2
    with pytest.raises(TypeError, match="Intervention or a Vector"):
        rq.score("x", stack="", interventions=["set 3"], splice=(), add_special_tokens=None)
    options = DecomposeOptions(stages=("a",), top_k=2, include_error=False, always={"a": [4, 5]}).to_proto()
    assert options.feature_filter[0].ids == [4, 5] and not options.include_error


def test_vectors_and_matrices_from_numpy_and_lists():
    np = pytest.importorskip("numpy")
    vector = Vector(S, np.arange(3, dtype=np.float32), scale=0.5)
    assert vector.values == (0.0, 1.0, 2.0) and vector.to_proto().scale == 0.5
    m = matrix(np.arange(6, dtype=np.float64).reshape(2, 3))
    assert (m.rows, m.cols, m.dtype) == (2, 3, t.DTYPE_FLOAT32)
    assert np.frombuffer(m.raw, "<f4").tolist() == [0, 1, 2, 3, 4, 5]
    half = matrix(np.ones(4, dtype=np.float16))
    assert (half.rows, half.cols, half.dtype, len(half.raw)) == (1, 4, t.DTYPE_FLOAT16, 8)
    with pytest.raises(ValueError, match="1-D or 2-D"):
        matrix(np.zeros((1, 2, 3)))


def test_retry_policy_backs_off_exponentially_with_jitter():
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=2.0, jitter=0.5, rng=random.Random(0))
    delays = [policy.delay(n) for n in range(6)]
    caps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert all(cap / 2 <= d <= cap for d, cap in zip(delays, caps, strict=True))
    assert RetryPolicy(jitter=0.0).delay(1) == pytest.approx(0.4)
    assert retry_policy(0).max_attempts == 1 and retry_policy(3).max_attempts == 4 and retry_policy(policy) is policy
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_channel_options_balance_dns_targets_and_keep_alive():
    dns = dict(channel_options("dns:///featurewire.ns.svc.cluster.local:50051"))
    assert dns["grpc.lb_policy_name"] == "round_robin"
    assert json.loads(dns["grpc.service_config"]) == {"loadBalancingConfig": [{"round_robin": {}}]}
    assert dns["grpc.keepalive_time_ms"] == 300_000 and dns["grpc.primary_user_agent"].startswith("featurewire-python/")
    plain = dict(channel_options("localhost:50051", keepalive_s=None, extra={"grpc.max_receive_message_length": 10}))
    assert "grpc.lb_policy_name" not in plain and "grpc.keepalive_time_ms" not in plain
    assert plain["grpc.max_receive_message_length"] == 10


def test_results_helpers():
    codes = fw.StageCodes(stage=0, name="a", ids=(4, 9), values=(2.0, -1.0), l0=5)
    assert codes.value(9) == -1.0 and codes.value(3) == 0.0 and codes.top(1) == [(4, 2.0)]
    assert codes.as_dict() == {4: 2.0, 9: -1.0}
    np = pytest.importorskip("numpy")
    dense = fw.to_numpy([codes, codes], 10)
    assert dense.shape == (2, 10) and dense[1, 9] == -1.0 and np.count_nonzero(dense) == 4
