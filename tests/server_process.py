"""A real `featurewire-serve serve` subprocess (for the SIGTERM, load and CLI tests): started from the repository
root, its stderr collected by a thread, ready when it logs "featurewire ready"; the gRPC port is read from
the log, so every caller can ask for port 0."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    port: int
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def log(self) -> str:
        return "".join(self.lines)

    @property
    def http_port(self) -> int | None:
        """The HTTP/JSON gateway's port, when the server was started with `--http-port`."""
        match = re.search(r"gateway on https?://[^\s]*:(\d+)", self.log)
        return int(match.group(1)) if match else None

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM (the drain path), then kill if it does not exit in time."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def launch(args: Sequence[str], *, timeout: float = 180, env: Mapping[str, str] | None = None) -> ServerProcess:
    """Start `python -m service serve ARGS` (with `env` added to this process's environment) and wait until it is
    ready (RuntimeError with the log tail if it exits or times out first)."""
    process = subprocess.Popen([sys.executable, "-m", "service", "serve", *args], cwd=ROOT,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if "featurewire ready" in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    waited = 0.0
    while not ready.wait(0.5):
        waited += 0.5
        if process.poll() is not None or waited >= timeout:
            process.kill()
            process.wait(10)
            raise RuntimeError("the server did not become ready:\n" + "".join(lines[-30:]))
    match = re.search(r"listening on 127\.0\.0\.1:(\d+)", "".join(lines))
    if match is None:
        process.kill()
        raise RuntimeError("the server did not log its port:\n" + "".join(lines[-30:]))
    return ServerProcess(process, int(match.group(1)), lines, reader)
