"""`make demo`'s client (service/demo.py) run for real on the tiny model: a real `serve` process with a stack that
has dashboards, token labels and steerability measured for the concept text's SearchFeatures matches; the demo
must read those records, steer with a measured feature at its measured best strength and report its top
dashboard tokens in both continuations."""

from __future__ import annotations

import re

import pytest

from core.config import ModelConfig
from service.demo import run_demo
from tests.service.engine.tiny_stacks import write_dashboard_stack
from trainer.cli import main as train_main

CONCEPT = "The cat sat on the mat with another cat."


@pytest.fixture(scope="module")
def measured_stack(tiny_gemma, tmp_path_factory):
    stack = write_dashboard_stack(tiny_gemma, tmp_path_factory.mktemp("demo") / "stack")
    assert train_main(["steerability", "--stack", str(stack), "--stage", "resid3", "--text", CONCEPT, "--top", "4",
                       "--openings", "2", "--samples", "0", "--tokens", "4", "--strengths", "add:max:4,16",
                       "set:max:16", "--model", "tiny-random", "--device", "cpu", "--quiet"]) == 0
    return stack


def test_the_demo_steers_with_a_measured_feature_and_reports_its_tokens(measured_stack, capsys):
    assert run_demo(measured_stack, ModelConfig(name="tiny-random", device="cpu"), concept=CONCEPT) == 0
    out = capsys.readouterr().out
    assert f"SearchFeatures {CONCEPT!r} at resid3" in out
    listed = re.findall(r"feature (\d+) +max \|z\| +[\d.]+ +density \S+ +(.*)", out)
    assert listed, out
    verdicts = [verdict for _, verdict in listed[:4]]
    assert all(v.startswith(("steers:", "does not steer")) for v in verdicts), verdicts  # the 4 measured ones
    if any(v.startswith("steers:") for v in verdicts):
        assert "picked the match that steers best" in out and "(measured best:" in out
    else:
        assert "no measured match steers" in out and "no measured strength" in out
    assert "the feature's top dashboard tokens: " in out
    assert re.search(r"top tokens in the steered continuation: ", out)
    assert re.search(r"top tokens in the default continuation: ", out)
    assert "SIGTERM: drained and exited with code 0" in out
