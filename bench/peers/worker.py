"""The peer side of bench/peers.py: a JSON-lines loop that runs in the peer virtual environment (.venv-peers).

A peer script builds its workload once (model, SAE, optimiser), then hands `serve` a dict of named calls.
bench/peers.py (in the project's .venv) sends one request per line on stdin and reads one answer per line:

    {"op": "time", "name": "step", "calls": 5, "args": {}}  ->  {"seconds": 0.123}   (per call, wall clock)
    {"op": "call", "name": "codes", "args": {}}  ->  {"result": <JSON value>}  (the call's return value)
    {"op": "quit"}                               ->  (exits)

Before the loop the script prints {"ready": true, "info": {...}} (versions, what it built), or
{"ready": false, "error": "..."} when the peer cannot run here; errors inside a call come back as
{"error": "..."} and the loop goes on. Libraries print to stdout freely: the protocol keeps its own copy of
the original stdout and everything else written to stdout goes to stderr, which bench/peers.py logs.
This file imports nothing from featurewire and nothing but the standard library and torch.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, TextIO

import torch


def protocol_stream() -> TextIO:
    """Keep the real stdout for the protocol and send every other write to stdout (print, tqdm) to stderr."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def sync() -> None:
    """Wait for queued GPU work so wall time covers it (no-op on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], calls: int) -> float:
    sync()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - started) / calls


def versions(*packages: str) -> dict[str, str]:
    """Installed versions of `packages` (distribution names), 'missing' for those not installed."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for name in packages:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    return found


def args() -> dict[str, Any]:
    """The peer script's arguments: one JSON object as argv[1]; sets torch's thread count when it names one."""
    parsed: dict[str, Any] = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    if parsed.get("threads"):
        torch.set_num_threads(int(parsed["threads"]))
    return parsed


def run(build: Callable[[dict[str, Any]], tuple[dict[str, Callable[..., Any]], dict[str, Any]]]) -> None:
    """Build the calls (reporting failure as not ready), then answer requests until quit or end of input."""
    out = protocol_stream()
    try:
        calls, info = build(args())
    except Exception as exc:  # the peer cannot run here: say why, and let the orchestrator go on without it
        traceback.print_exc()
        out.write(json.dumps({"ready": False, "error": f"{type(exc).__name__}: {exc}"}) + "\n")
        return
    out.write(json.dumps({"ready": True, "info": info}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") == "quit":
            break
        try:
            named, kwargs = calls[request["name"]], request.get("args", {})

            def fn(named: Callable[..., Any] = named, kwargs: dict[str, Any] = kwargs) -> Any:
                return named(**kwargs)

            if request["op"] == "time":
                answer: dict[str, Any] = {"seconds": timed(fn, int(request.get("calls", 1)))}
            else:
                answer = {"result": fn()}
        except Exception as exc:
            traceback.print_exc()
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(answer) + "\n")
