"""bench/peers.py degrades gracefully: without the peer environment every item is skipped with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_peers_without_the_peer_venv_skips_every_item(tmp_path):
    missing = tmp_path / "no-venv" / "bin" / "python"
    out = subprocess.run([sys.executable, str(BENCH / "peers.py"), "--peer-python", str(missing), "--json"],
                         capture_output=True, text=True, check=True, timeout=300)
    result = json.loads(out.stdout)
    assert [row["item"] for row in result["rows"]] == ["train", "train", "decompose", "generate"]
    assert all("make bench-peers" in row["skipped"] for row in result["rows"])
    assert "skipped" in out.stderr and result["machine"]["cpu_count"] >= 1
