"""`featurewire-train train` reads the host-model settings as `featurewire-serve` does: the config's [model]
section, then FEATUREWIRE_MODEL/DEVICE/DTYPE/CACHE, then flags (run as a real CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "trainer" / "configs" / "smoke.toml"


def _train(tmp_path: Path, env: dict[str, str], *flags: str) -> dict:
    out = tmp_path / "run"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FEATUREWIRE_")} | env
    subprocess.run([sys.executable, "-m", "trainer", "train", "--config", str(SMOKE), "--out", str(out), "--quiet",
                    *flags], cwd=ROOT, env=environ, check=True, capture_output=True, timeout=600)
    return json.loads((out / "report.json").read_text())["config"]["model"]


def test_environment_overrides_the_config_and_flags_override_the_environment(tmp_path):
    env = {"FEATUREWIRE_MODEL": "tiny-random-neox", "FEATUREWIRE_DTYPE": "float32", "FEATUREWIRE_DEVICE": "cpu",
           "FEATUREWIRE_CACHE": str(tmp_path / "cache")}
    assert _train(tmp_path / "env", env)["name"] == "tiny-random-neox"
    assert _train(tmp_path / "flag", env, "--model", "tiny-random")["name"] == "tiny-random"
