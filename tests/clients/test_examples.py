"""The scripts under examples/ run against a live server (here the in-process one), as a user would run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize(("script", "expected"), [
    ("monitor_feature.py", ["watching feature", "LENGTH:"]),
    ("steer.py", ["pinned to 8", "steered:", "default:", "KL"]),
    ("stop_on_feature.py", ["FEATURE_CONDITION: fired at position"]),
])
def test_example_runs(target, script, expected):
    done = subprocess.run([sys.executable, str(EXAMPLES / script), "--target", target, "--max-new-tokens", "8"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for text in expected:
        assert text in done.stdout, done.stdout


def test_examples_use_only_the_client_library():
    for path in EXAMPLES.glob("*.py"):
        source = path.read_text()
        assert "from featurewire import" in source
        for banned in ("import torch", "from service", "import service", "from trainer", "featurewire.v1"):
            assert banned not in source, f"{path.name}: {banned}"
