"""The full gRPC server: host model, stacks and the engine behind the Featurewire API.

The lifecycle (bind, health before loading, readiness after warm-up, metrics, SIGTERM drain) is shared
with the activation-only server and lives in service/lifecycle.py; this module loads the host model and
the stacks (self-checked) and starts the engine.

Stacks fail fast: a stack that does not load or fails its self-check (wrong host model, hookpoint
mix-up, FVE/L0 off the recorded metrics) stops startup with its message and a non-zero exit, instead of
serving without it. A deployment that names a stack relies on it; a crash loop with a clear reason is
easier to notice than a replica that silently lacks a stack and answers NOT_FOUND. Operators who know
what they are doing can pass `--no-self-check`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from core.config import ModelConfig
from core.errors import FailedPrecondition
from core.host.host_model import HostModel
from core.host.loading import load_host_model
from service import __version__
from service.config import ServerConfig
from service.engine.contract.specs import DecomposeSpec
from service.engine.execution.engine import Engine, deadline_after
from service.engine.execution.threads import in_transient_thread
from service.engine.operations.decompose import decompose_events
from service.engine.stacks.served import ServedStack, load_served_stack
from service.lifecycle import SERVICE_NAMES, ServerBase, run_server
from service.servicer import FeaturewireServicer

log = logging.getLogger(__name__)

WARM_UP_TEXT = "The quick brown fox jumps over the lazy dog."
WARM_UP_TIMEOUT_S = 300.0


class Server(ServerBase):
    """One featurewire server: grpc.aio server, engine, health, metrics. Create and use it on one event loop."""

    def __init__(self, model_config: ModelConfig, config: ServerConfig, *,
                 registry: CollectorRegistry | None = None) -> None:
        super().__init__(config, registry=registry)
        self.model_config = model_config
        self.servicer = FeaturewireServicer(config, self.metrics)
        self.host: HostModel | None = None
        self.stacks: dict[str, ServedStack] = {}
        self.engine: Engine | None = None

    async def _load(self) -> None:
        """Host model, then every stack (self-checked), off the event loop so health keeps answering, on threads
        that exit: after them only the engine's worker runs torch (service/engine/execution/threads.py)."""
        started = time.perf_counter()
        host = await in_transient_thread(lambda: load_host_model(self.model_config))
        self.host = host
        self.metrics.set_model_load_time(time.perf_counter() - started)
        summary = host.summary()
        self.metrics.set_build_info(__version__, host.name, summary.device, summary.dtype)
        for path in self.config.stacks:
            await self._load_stack(host, path)
        self.engine = Engine(host, self.stacks, self.config.engine_settings(), self.metrics)

    async def _load_stack(self, host: HostModel, path: Path) -> None:
        started = time.perf_counter()
        stack = await in_transient_thread(lambda: load_served_stack(path, host, self_check=self.config.self_check))
        if stack.name in self.stacks:
            raise FailedPrecondition(f"two stacks are named {stack.name!r} ({self.stacks[stack.name].path} and "
                                     f"{path}); stack names must be unique on a server")
        seconds = time.perf_counter() - started
        self.stacks[stack.name] = stack
        self.metrics.register_stack(stack.name, stack.stage_names, seconds)
        if self.config.self_check:
            passed, fve = _self_check_summary(stack)
            self.metrics.record_self_check(stack.name, passed, fve)
        log.info("loaded stack %s (%d stages, digest %s) from %s in %.1fs", stack.name, len(stack.stage_names),
                 stack.digest[:12], path, seconds)

    async def _warm_up(self) -> None:
        """One short pass through the worker (per stack, a Decompose), so the first request is not the slow one."""
        assert self.engine is not None and self.host is not None
        host, engine = self.host, self.engine
        ids = tuple(int(i) for i in host.encode(WARM_UP_TEXT)[0].tolist())
        deadline = deadline_after(WARM_UP_TIMEOUT_S)
        started = time.perf_counter()
        if not self.stacks:
            await engine.call(lambda: host.forward(host.encode(WARM_UP_TEXT)), deadline=deadline, method="warmup")
        for stack in self.stacks.values():
            spec = DecomposeSpec(stack=stack.name, token_ids=ids, stages=tuple(range(len(stack.stage_names))),
                                 top_k=8, include_error=True)
            await engine.call(lambda s=stack, sp=spec: list(decompose_events(host, s, sp)), deadline=deadline,
                              method="warmup")
        log.info("warmed up in %.2fs", time.perf_counter() - started)

    def loaded_tokenizer(self) -> Any:
        return self.host.tokenizer if self.host is not None else None

    def _attach(self) -> str:
        assert self.host is not None and self.engine is not None
        self.servicer.attach(self.host, self.stacks, self.engine)
        return f"model {self.model_config.name}, stacks {', '.join(self.stacks) or 'none'}"

    async def _shutdown_backend(self) -> None:
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown, 5.0)


def _self_check_summary(stack: ServedStack) -> tuple[bool, dict[str, float]]:
    """(passed, measured FVE by stage name) from the stack's self-check record {stage: {fve, passed, ...}}."""
    results = [(name, r) for name, r in stack.self_check.items() if isinstance(r, dict)]
    fve = {name: float(r["fve"]) for name, r in results if isinstance(r.get("fve"), int | float)}
    return all(bool(r.get("passed", True)) for _, r in results), fve


async def serve(model_config: ModelConfig, server_config: ServerConfig, *,
                ready_event: asyncio.Event | None = None, handle_signals: bool = True) -> int:
    """Run a full server until SIGTERM/SIGINT (or `Server.stop`), then return the exit status 0.

    A signal during startup abandons the loading and stops at once; a startup failure raises.
    """
    return await run_server(Server(model_config, server_config), ready_event=ready_event,
                            handle_signals=handle_signals)


__all__ = ["SERVICE_NAMES", "Server", "serve"]
