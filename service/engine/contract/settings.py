"""What the engine is told of its deployment: request limits and scheduler numbers, nothing of transport.

The server builds one `EngineSettings` from its `ServerConfig` (`ServerConfig.engine_settings()`); the engine,
its validators and its scheduler read only this, so they can be built in tests, benchmarks and other faces
without a gRPC configuration.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.engine.contract.inputs import Limits


@dataclass(frozen=True)
class EngineSettings:
    """Request limits (checked by the validators, reported by GetServerInfo) and the scheduler's numbers."""

    limits: Limits
    max_batch_size: int = 16
    """Requests the engine runs at once, and sequences in one forward pass (continuous batching)."""
    max_batch_tokens: int = 4096
    """Tokens in one forward pass; prefills beyond it wait for the next step (a longer prompt runs alone)."""
    threads: int = 0
    """CPU threads of the engine's torch work; 0 = chosen from the machine (execution/threads.py)."""

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_size and max_batch_tokens must be >= 1, got {self.max_batch_size} and "
                             f"{self.max_batch_tokens}")
        if self.threads < 0:
            raise ValueError(f"threads must be 0 (chosen from the machine) or a positive count, got {self.threads}")

    @property
    def queue_size(self) -> int:
        """Requests waiting for the engine beyond which new ones are refused (RESOURCE_EXHAUSTED)."""
        return self.limits.queue_size
