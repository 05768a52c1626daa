"""The orchestrator's side of the peer benchmarks (bench/peers.py): a worker process in the peer venv that
builds its workload once and times it on request (the JSON-lines protocol of bench/peers/worker.py), and the
interleaving and ratio helpers every item uses."""

from __future__ import annotations

import json
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PEERS = Path(__file__).resolve().parent / "peers"


class Peer:
    """One worker process in the peer venv; `ready` False (with `error`) when it could not start or build."""

    def __init__(self, python: Path, script: str, cfg: dict[str, Any], log_dir: Path, timeout: float = 900) -> None:
        self.name, self.error, self.info, self.ready = script, "", {}, False
        self.log = log_dir / f"{Path(script).stem}.log"
        if not python.exists():
            self.error = f"no peer environment at {python.parent.parent.name}: run `make bench-peers`"
            return
        self.process = subprocess.Popen([str(python), str(PEERS / script), json.dumps(cfg)], cwd=PEERS, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log.open("w"))
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        first = self._answer(timeout)
        self.ready, self.info = bool(first.get("ready")), first.get("info", {})
        if not self.ready:
            self.error = first.get("error", "no answer") + f" (log: {self.log})"
            self.close()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put("")

    def _answer(self, timeout: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return {"error": f"no answer within {timeout:.0f} s"}
        if not line:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
            return {"error": "the peer exited: " + " | ".join(tail)}
        return json.loads(line)

    def request(self, op: str, name: str, timeout: float = 1800, **fields: Any) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, "name": name, **fields}) + "\n")
        self.process.stdin.flush()
        answer = self._answer(timeout)
        if "error" in answer:
            raise RuntimeError(f"{self.name} {name}: {answer['error']}")
        return answer.get("seconds", answer.get("result"))

    def time(self, name: str, calls: int = 1, **args: Any) -> float:
        return float(self.request("time", name, calls=calls, args=args))

    def call(self, name: str, **args: Any) -> Any:
        return self.request("call", name, args=args)

    def close(self) -> None:
        if getattr(self, "process", None) is not None and self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.write('{"op": "quit"}\n')
                self.process.stdin.close()
                self.process.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()


def timed(fn: Callable[[], Any], calls: int = 1) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls


def interleave(variants: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Seconds per variant per repeat; each callable returns its own seconds; order reversed every other repeat."""
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(repeats):
        for name in (list(variants) if repeat % 2 == 0 else list(reversed(variants))):
            seconds[name].append(variants[name]())
    return seconds


def ratio(seconds: dict[str, list[float]], peer: str | list[str], ours: str) -> float:
    """Median over repeats of peer time / our time (the faster of several peers per repeat)."""
    peers = [peer] if isinstance(peer, str) else peer
    return statistics.median(min(seconds[p][i] for p in peers) / s for i, s in enumerate(seconds[ours]))


def skipped(item: str, why: str) -> dict[str, Any]:
    print(f"[{item}] skipped: {why}", file=sys.stderr)
    return {"item": item, "skipped": why}
