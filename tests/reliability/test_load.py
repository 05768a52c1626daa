"""A short version of the soak load (tests/reliability/load.py): a real server process, eight concurrent
clients mixing Decompose, steered Generate, cancellations and deadline expiries. Nothing is timed; what is
asserted is that every kind ran, every call ended with a code its kind may end with, the server stayed
SERVING and its memory did not grow beyond a small bound once warm."""

from __future__ import annotations

from pathlib import Path

from tests.reliability.load import KINDS, run_load, server_process

RSS_GROWTH_BOUND = 96 << 20


def test_mixed_load_keeps_the_server_healthy_and_its_memory_flat(rel_stack: Path) -> None:
    with server_process("tiny-random", rel_stack, queue_size=16) as (process, port):
        report = run_load(f"127.0.0.1:{port}", process.pid, duration_s=8.0, clients=8, warmup_s=4.0)
    print(report)
    assert report["unexpected"] == {}, report
    assert report["health_after"] == "SERVING"
    ran = {key.split(":")[0] for key in report["codes"]}
    assert ran == set(KINDS), report["codes"]
    assert report["codes"].get("decompose:OK", 0) > 0 and report["codes"].get("generate:OK", 0) > 0
    assert report["codes"].get("cancel:CANCELLED", 0) > 0
    if report["rss_before_bytes"]:  # Linux: /proc is there
        assert report["rss_growth_bytes"] < RSS_GROWTH_BOUND, report
