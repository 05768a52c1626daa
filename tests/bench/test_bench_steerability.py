"""bench/steerability.py keeps running (tiny sizes, JSON parsed; no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from core.stack.reader import read_stack
from tests.service.engine.tiny_stacks import write_dashboard_stack

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_steerability_reports_the_ratios(tmp_path, tiny_gemma):
    stack = write_dashboard_stack(tiny_gemma, tmp_path / "stack")
    stage = read_stack(stack).stages[-1]
    fired = [f for f in range(stage.sae.d_sae) if int(stage.dashboard["count"][:, f].sum()) > 0][:2]
    out = subprocess.run([sys.executable, str(BENCH / "steerability.py"), "--stack", str(stack), "--model",
                          "tiny-random", "--device", "cpu", "--features", ",".join(map(str, fired)), "--batch-rows",
                          "8", "--tokens", "3", "--repeats", "1", "--fpm-features", "0", "--json"],
                         capture_output=True, text=True, check=True, timeout=300)
    result = json.loads(out.stdout[out.stdout.index("{\n"):])
    assert result["generation"]["ratio"] > 0 and result["evaluation"]["ratio_to_hf_generate"] > 0
    assert result["evaluation"]["features"] == len(fired) and result["batch_rows"] == 8
    assert "default_settings" not in result  # --fpm-features 0 skips the slow default-settings run
