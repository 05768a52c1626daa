"""The stack's steerability record: attached as a hashed file, read back checked, refused when malformed."""

from __future__ import annotations

import json

import pytest

from core.sae import SAEConfig, build_sae
from core.stack.identity import HostModelIdentity
from core.stack.manifest import StackError
from core.stack.reader import read_stack
from core.stack.steerability import attach_steerability, parse_steerability
from core.stack.writer import StageSpec, write_stack

POINT = {"op": "add", "unit": "max", "value": 4.0, "expression": 0.5, "fluency_cost": 0.3}
RECORD = {"curve": [POINT], "verdict": {"steers": True, "best": {"op": "add", "unit": "max", "value": 4.0}},
          "output_score": 0.2}


@pytest.fixture
def stack(tmp_path):
    sae = build_sae(SAEConfig("relu", d_in=8, d_sae=40)).eval()
    identity = HostModelIdentity("m", "gemma3_text", 2, 8, 100, "x")
    return write_stack(tmp_path / "s", "s", identity, [StageSpec(sae, "blocks.0.hook_resid_post", 1.0)])


def test_round_trip_and_replacement(stack):
    assert read_stack(stack).stages[0].steerability is None
    (first,) = attach_steerability(stack, {0: {"stage": "a", "settings": {"k": 1}, "features": {3: RECORD}}})
    loaded = read_stack(stack).stages[0].steerability
    assert loaded["features"] == {3: RECORD} and loaded["settings"] == {"k": 1}
    manifest = json.loads((stack / "stack.json").read_text())
    assert manifest["stages"][0]["steerability"]["count"] == 1 and manifest["stages"][0]["steerability"]["steers"] == 1
    (second,) = attach_steerability(stack, {0: {"settings": {}, "features": {3: RECORD, 7: RECORD}}})
    assert second != first and not (stack / first).exists()
    assert sorted(read_stack(stack).stages[0].steerability["features"]) == [3, 7]


@pytest.mark.parametrize(("features", "message"), [
    ({"40": RECORD}, "not an id in [0, 40)"),
    ({"1": {"curve": [{**POINT, "op": "mul"}], "verdict": {"steers": False, "best": None}}}, "needs op (add|set)"),
    ({"1": {"curve": [], "verdict": {"steers": "yes", "best": None}}}, "verdict must be an object with steers"),
    ({"1": {"verdict": {"steers": False, "best": None}}}, "must be an object with a curve list"),
])
def test_malformed_records_are_refused(features, message):
    data = json.dumps({"format": 1, "features": features}).encode()
    with pytest.raises(StackError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_steerability(data, 40)


def test_a_changed_file_fails_the_hash_check(stack):
    (name,) = attach_steerability(stack, {0: {"features": {3: RECORD}}})
    (stack / name).write_text(json.dumps({"format": 1, "features": {}}))
    with pytest.raises(StackError):
        read_stack(stack)
