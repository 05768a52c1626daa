"""The activation-only server (`featurewire-serve serve --no-model --stack DIR`): no host model, no torch.

For applications that run their model elsewhere and send the activations they captured: it loads each
stack's manifest and ONNX graphs (written by `featurewire-train export-onnx`), verifies them, opens one
ONNX Runtime session per stage (CUDA when a GPU is present, CPU otherwise), warms them up and serves
EncodeActivations, GetServerInfo and ListStacks; health, reflection, metrics, TLS and auth work as in the
full server (service/lifecycle.py). Nothing imported here pulls in torch or transformers, which is what
keeps its memory footprint small (docs/benchmarks.md); tests/service/test_activation_only.py checks it.

There is no self-check against calibration text (it needs the host model): the graphs were checked
against torch when they were exported (their parity is recorded in stack.json), and their hashes and
the weights they were exported from are verified at load.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from core.errors import FailedPrecondition
from service import __version__
from service.activation_servicer import ActivationOnlyServicer, EncodeWorker
from service.config import ServerConfig
from service.engine.stacks.onnx_runtime import OnnxStack, load_onnx_stack, providers_for
from service.lifecycle import ServerBase, run_server

log = logging.getLogger(__name__)


class ActivationServer(ServerBase):
    """Stacks as ONNX Runtime sessions behind the Featurewire API; no host model."""

    def __init__(self, config: ServerConfig, *, device: str = "auto",
                 registry: CollectorRegistry | None = None) -> None:
        super().__init__(config, registry=registry)
        self.device = device
        self.servicer = ActivationOnlyServicer(config, self.metrics)
        self.stacks: dict[str, OnnxStack] = {}
        self.worker: EncodeWorker | None = None

    async def _load(self) -> None:
        if not self.config.stacks:
            raise FailedPrecondition("the activation-only mode (--no-model) serves stacks only: pass --stack DIR "
                                     "(a stack with ONNX graphs, see `featurewire-train export-onnx`)")
        providers = providers_for(self.device)
        for path in self.config.stacks:
            await self._load_stack(Path(path), providers)
        provider = next(iter(self.stacks.values())).provider
        self.metrics.set_build_info(__version__, "", "cuda" if provider.startswith("CUDA") else "cpu", "float32")
        self.worker = EncodeWorker(self.config.queue_size)
        worker = self.worker
        self.metrics.queue_depth_from(lambda: worker.queue_depth, self.config.queue_size)

    async def _load_stack(self, path: Path, providers: list) -> None:
        started = time.perf_counter()
        stack = await asyncio.to_thread(load_onnx_stack, path, providers=providers)
        if stack.name in self.stacks:
            raise FailedPrecondition(f"two stacks are named {stack.name!r} ({self.stacks[stack.name].summary.path} "
                                     f"and {path}); stack names must be unique on a server")
        seconds = time.perf_counter() - started
        self.stacks[stack.name] = stack
        self.metrics.register_stack(stack.name, stack.stage_names, seconds)
        log.info("loaded stack %s (%d of %d stages as ONNX graphs on %s, digest %s) from %s in %.1fs", stack.name,
                 len(stack.stages), len(stack.stage_names), stack.provider, stack.summary.digest[:12], path, seconds)

    async def _warm_up(self) -> None:
        assert self.worker is not None
        started = time.perf_counter()
        for stack in self.stacks.values():
            await self.worker.run(stack.warm_up, deadline=None, method="warmup")
        log.info("warmed up in %.2fs", time.perf_counter() - started)

    def _attach(self) -> str:
        assert self.worker is not None
        self.servicer.attach(self.stacks, self.worker)
        return f"activation-only ({self.servicer.backend}), stacks {', '.join(self.stacks)}"

    async def _shutdown_backend(self) -> None:
        if self.worker is not None:
            await asyncio.to_thread(self.worker.shutdown)


async def serve_activation_only(server_config: ServerConfig, *, device: str = "auto",
                                ready_event: asyncio.Event | None = None, handle_signals: bool = True) -> int:
    """Run an activation-only server until SIGTERM/SIGINT, then return 0; a startup failure raises."""
    return await run_server(ActivationServer(server_config, device=device), ready_event=ready_event,
                            handle_signals=handle_signals)


__all__ = ["ActivationServer", "serve_activation_only"]
