"""End-to-end on the embedded Gemma 3 270M, offline (converted into the cache on first use)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from core.host.host_model import SamplingParams

pytestmark = pytest.mark.slow


def test_default_model_has_72_hookpoints_of_width_640(default_host):
    summary = default_host.summary()
    assert (summary.model_type, summary.num_layers, summary.d_model) == ("gemma3_text", 18, 640)
    assert len(default_host.hookpoints) == 72
    assert {p.dim for p in default_host.hookpoints} == {640}


@pytest.mark.parametrize(
    "prompt, expected",
    [("Monday, Tuesday, Wednesday,", " Thursday"), ("The Eiffel Tower is in the city of", " Paris")],
)
def test_default_model_greedily_continues_a_prompt(default_host, prompt, expected):
    new, _ = default_host.generate(default_host.encode(prompt), SamplingParams(max_new_tokens=4))
    assert default_host.decode(new[0]).startswith(expected)


def test_hookpoints_cli_lists_the_default_model(default_host):
    env = {**os.environ, "FEATUREWIRE_DEVICE": "cpu"}
    out = subprocess.run(
        [sys.executable, "-m", "service", "hookpoints", "--model", "default", "--json"],
        capture_output=True, text=True, check=True, env=env, timeout=300,
    )
    listing = json.loads(out.stdout)
    assert listing["model"]["num_layers"] == 18
    assert len(listing["hookpoints"]) == 72 and {p["dim"] for p in listing["hookpoints"]} == {640}
    assert listing["hookpoints"][-1]["name"] == "blocks.17.hook_resid_post"
