"""Distributed training under `torchrun`: process-group setup from its environment, and every collective
the trainer needs, behind one `Distributed` value that is a no-op in a single process (`LOCAL`).

Two modes (`[distributed] mode` in the training config):

- "data": every rank reads the same seeded batch stream and keeps its own contiguous slice of each
  global batch's rows, so N ranks train on exactly the batches one process would. After backward each
  stage's gradients are averaged with one flat all-reduce (every SAE loss is a mean over tokens, so the
  average of the per-rank gradients is the gradient on the global batch). What is not a gradient is made
  global too: dead-latent firing (all-reduced, token counts are global, so resets happen identically on
  every rank), the first batch that initialises b_dec (all-gathered), BatchTopK's batch-level selection
  (the cutoff over the global batch, from all-gathered per-rank candidates) and the training summaries
  (averaged). Resampling is deterministic from replicated state; the torch RNG is seeded alike on all ranks.
  A meta-SAE trains on decoder rows, which are identical everywhere, so it is simply replicated. BatchTopK
  keeps acts >= the global cutoff, which equals the single-process top-k except for exact ties at it.
- "stages": rank r trains stages r, r+N, ... on full batches; at every checkpoint and at the end the
  owners broadcast their stages (as one-stage checkpoints: weights, Adam state, dead-latent counters, a
  meta-SAE), so rank 0 saves and writes the stack.

Why a manual all-reduce rather than DistributedDataParallel: `train_step` projects and clips gradients
between backward and the optimiser step, several stages share one batch, and an SAE's gradient is one
bucket anyway, so wrapping each SAE would buy nothing but attribute forwarding. Activation collection runs on
every rank, in either mode: each takes a contiguous slice of the batches and writes its shards into the one
store, which holds the same bytes as a single process's (trainer/data/activations.py; the run directory
must be shared). Only rank 0 writes checkpoints, the stack and the report; every rank loads a checkpoint.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from core.sae.batchtopk import BatchTopKSAE
from trainer.training.checkpoint import META, TENSORS, StageTrainingState, load_checkpoint, save_checkpoint

if TYPE_CHECKING:
    from trainer.training.config import TrainConfig

logger = logging.getLogger(__name__)
T = TypeVar("T")

# A rank may wait at a barrier for a long time (e.g. while a slower rank finishes its share of a collection).
COLLECTIVE_TIMEOUT = timedelta(hours=2)
_STAGE_FINGERPRINT = "stage-broadcast"  # of the one-stage checkpoints that carry a stage between ranks


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run; every method is a no-op (or the identity) when world == 1."""

    rank: int = 0
    world: int = 1
    mode: str = "data"
    device: torch.device = torch.device("cpu")  # where collective buffers live (the rank's GPU with nccl)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_parallel(self) -> bool:
        return self.world > 1 and self.mode == "data"

    @property
    def stage_parallel(self) -> bool:
        return self.world > 1 and self.mode == "stages"

    def for_config(self, cfg: TrainConfig) -> Distributed:
        """This run's mode, checked against the config (data mode splits each batch evenly)."""
        mode = cfg.distributed.mode if cfg.distributed else "data"
        if self.world > 1 and mode == "data" and cfg.training.batch_size % self.world:
            raise ValueError(f"training.batch_size {cfg.training.batch_size} must be divisible by the "
                             f"{self.world} ranks in data-parallel mode")
        if self.is_main and mode == "stages" and self.world > len(cfg.stack.hookpoints):
            logger.warning("%d ranks share %d stages: ranks %d.. have nothing to train", self.world,
                           len(cfg.stack.hookpoints), len(cfg.stack.hookpoints))
        return replace(self, mode=mode)

    def owner(self, stage: int) -> int:
        """The rank that trains `stage` (every rank in data mode trains every stage)."""
        return stage % self.world if self.stage_parallel else self.rank

    def owns(self, stage: int) -> bool:
        return self.owner(stage) == self.rank

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather_objects(self, value: T) -> list[T]:
        """Every rank's `value` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [value]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered

    def main_value(self, value: T) -> T:
        """Rank 0's `value` on every rank (so that all ranks take the same branch)."""
        return self.gather_objects(value)[0]

    def local_rows(self, batches: Iterator[dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
        """Data mode: this rank's contiguous slice of every global batch {name: (B, ...)} -> (B / N, ...)."""
        return self._slices(batches) if self.data_parallel else batches

    def _slices(self, batches: Iterator[dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
        for batch in batches:
            n = len(next(iter(batch.values())))
            lo, hi = n * self.rank // self.world, n * (self.rank + 1) // self.world
            yield {name: rows[lo:hi] for name, rows in batch.items()}

    def gather_rows(self, x: Tensor) -> Tensor:
        """Data mode: the global batch (B, d) from every rank's (B / N, d), in rank order."""
        if not self.data_parallel:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def firing(self, z: Tensor) -> tuple[Tensor, int]:
        """Which latents fired anywhere in the global batch (d_sae,) bool, and the global token count."""
        fired = (z != 0).any(dim=0)  # (d_sae,)
        if not self.data_parallel:
            return fired, z.shape[0]
        counts = fired.to(torch.int32)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        return counts.bool(), z.shape[0] * self.world

    @property
    def gradient_sync(self) -> Callable[[nn.Module], None] | None:
        """What `train_step` calls between backward and the gradient clipping (None: nothing to sync)."""
        return self.average_gradients if self.data_parallel else None

    def average_gradients(self, module: nn.Module) -> None:
        """Average the gradients over ranks with one flat all-reduce. Which parameters have a gradient
        depends only on replicated state (the dead mask, the step), so it is the same set on every rank."""
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def batch_cutoff(self, acts: Tensor, k: int) -> Tensor:
        """BatchTopK over the global batch: the smallest positive value among the B·k largest entries of
        every rank's (B / N, d_sae) ReLU pre-activations together, () (0 when none is positive). Each rank
        sends its own B·k largest, which must contain its share of the global top B·k."""
        budget = acts.shape[0] * self.world * k
        flat = acts.detach().flatten()  # (B / N · d_sae,)
        top = flat.topk(min(budget, flat.numel()), sorted=False).values.contiguous()
        parts = [torch.empty_like(top) for _ in range(self.world)]
        dist.all_gather(parts, top)
        pooled = torch.cat(parts)
        best = pooled.topk(min(budget, pooled.numel()), sorted=False).values
        positive = best[best > 0]
        return positive.min() if positive.numel() else acts.new_zeros(())

    def prepare(self, states: list[StageTrainingState]) -> None:
        """Data mode: BatchTopK stages select over the global batch (undone by `finish`)."""
        if self.data_parallel:
            for state in states:
                if isinstance(state.sae, BatchTopKSAE):
                    state.sae.batch_cutoff = self.batch_cutoff

    def collect_stages(self, states: list[StageTrainingState]) -> None:
        """Stage mode: every stage's owner broadcasts it to all ranks, as a one-stage checkpoint (weights,
        Adam state, dead-latent counters and whatever else the checkpoint format holds)."""
        if not self.stage_parallel:
            return
        with tempfile.TemporaryDirectory(prefix="featurewire-stage-") as tmp:
            directory = Path(tmp)
            for index, state in enumerate(states):
                owner = self.owner(index)
                if self.rank == owner:
                    save_checkpoint(directory, 0, _STAGE_FINGERPRINT, [state])
                for name in (TENSORS, META):
                    data = self._broadcast_bytes((directory / name).read_bytes() if self.rank == owner else b"",
                                                 owner)
                    if self.rank != owner:
                        (directory / name).write_bytes(data)
                if self.rank != owner:
                    load_checkpoint(directory, _STAGE_FINGERPRINT, [state])

    def finish(self, states: list[StageTrainingState], summaries: list[dict[str, float]]) -> list[dict[str, float]]:
        """Undo `prepare`; the training summaries of the whole run (averaged over ranks, or from each owner)."""
        for state in states:
            if isinstance(state.sae, BatchTopKSAE):
                state.sae.batch_cutoff = None
        if self.data_parallel:
            return [self._mean(summary) for summary in summaries]
        if self.stage_parallel:
            return [json.loads(self._broadcast_bytes(json.dumps(s).encode() if self.owns(i) else b"",
                                                     self.owner(i)))
                    for i, s in enumerate(summaries)]
        return summaries

    def _mean(self, summary: dict[str, float]) -> dict[str, float]:
        if not summary:  # no step ran (a resumed run that had finished): empty on every rank
            return summary
        keys = sorted(summary)  # the same keys on every rank: the same code logged them
        values = torch.tensor([summary[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        return {k: float(v) / self.world for k, v in zip(keys, values.tolist(), strict=True)}

    def _broadcast_bytes(self, payload: bytes, src: int) -> bytes:
        size = torch.tensor([len(payload)], dtype=torch.int64, device=self.device)
        dist.broadcast(size, src)
        if self.rank == src:
            buffer = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device)
        else:
            buffer = torch.empty(int(size), dtype=torch.uint8, device=self.device)
        dist.broadcast(buffer, src)
        return payload if self.rank == src else bytes(buffer.cpu().numpy())


LOCAL = Distributed()
"""A single process: what `run_training` uses when it is not started by torchrun."""


def from_env(env: Mapping[str, str], device: str) -> Distributed:
    """Join the process group torchrun describes in `env` (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT):
    nccl with one GPU per rank when the model runs on CUDA, else gloo. LOCAL without torchrun."""
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        return LOCAL
    if device.startswith("cuda:"):
        raise ValueError(f"model.device {device!r} pins one GPU; under torchrun use 'auto' or 'cuda' "
                         "(each rank takes the GPU of its LOCAL_RANK)")
    rank, local_rank = int(env["RANK"]), int(env.get("LOCAL_RANK", env["RANK"]))
    on_gpu = device != "cpu" and torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(local_rank)  # 'cuda' now means this rank's GPU, for the model and the SAEs
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpu else "gloo", rank=rank, world_size=world,
                                timeout=COLLECTIVE_TIMEOUT)
    return Distributed(rank, world, device=torch.device("cuda", local_rank) if on_gpu else torch.device("cpu"))


@contextmanager
def session(env: Mapping[str, str], device: str) -> Iterator[Distributed]:
    """`from_env`, and leave the process group on exit (when this call created it)."""
    created = not dist.is_initialized()
    parallel = from_env(env, device)
    try:
        yield parallel
    finally:
        if parallel.world > 1 and created and dist.is_initialized():
            dist.destroy_process_group()
