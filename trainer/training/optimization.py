"""One optimiser step for an SAE, dead-latent tracking, schedules, and a small in-memory fit loop.

The full trainer (`trainer/training/loop.py`) streams activations from disk with checkpoints; the tests and
synthetic experiments use `fit_in_memory`. Both go through `train_step`, so the decoder-norm upkeep,
gradient clipping and dead-latent handling exist once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from core.sae.base import ForwardOutput, SparseAutoencoder, l0


class DeadLatentTracker:
    """Counts tokens since each latent last fired; a latent is dead after `dead_after_tokens`."""

    def __init__(self, d_sae: int, dead_after_tokens: int, device: torch.device | str = "cpu") -> None:
        self.dead_after_tokens = dead_after_tokens
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)

    def update(self, z: Tensor) -> None:
        self.record((z != 0).any(dim=0), z.shape[0])

    def record(self, fired: Tensor, tokens: int) -> None:
        """`fired` (d_sae,) bool over a batch of `tokens` tokens (data-parallel: the global batch)."""
        self.tokens_since_fired += tokens
        self.tokens_since_fired[fired] = 0

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.dead_after_tokens  # (d_sae,)

    def revived(self, mask: Tensor) -> None:
        """Give revived latents a fresh window before they can be declared dead again."""
        self.tokens_since_fired[mask] = 0


def lr_factor(step: int, warmup_steps: int, total_steps: int, decay_fraction: float = 0.2) -> float:
    """Linear warm-up, constant, then linear decay to 0 over the last `decay_fraction` of training."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_start = total_steps * (1 - decay_fraction)
    if decay_fraction > 0 and step >= decay_start:
        return max(0.0, (total_steps - step) / (total_steps - decay_start))
    return 1.0


def sparsity_factor(step: int, warmup_steps: int) -> float:
    """λ is warmed up linearly from 0 (Gemma Scope recipe), so early training finds directions first."""
    return 1.0 if not warmup_steps else min(1.0, (step + 1) / warmup_steps)


def make_optimizer(sae: SparseAutoencoder, lr: float) -> torch.optim.Adam:
    return torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))


def train_step(
    sae: SparseAutoencoder,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    *,
    sparsity_scale: float = 1.0,
    dead_mask: Tensor | None = None,
    max_grad_norm: float = 1.0,
    penalty: Callable[[SparseAutoencoder], Tensor] | None = None,
    sync_grads: Callable[[SparseAutoencoder], None] | None = None,
) -> ForwardOutput:
    """Forward, backward, keep decoder rows unit norm, step. Returns the (detached) forward output.

    `penalty(sae)`, when given, is a scalar added to the loss (e.g. the meta-SAE decomposability term,
    trainer/training/meta_sae.py) and reported as losses["penalty"]; it goes through the same decoder-norm upkeep.
    `sync_grads(sae)` runs right after backward (data-parallel training averages gradients over ranks there)."""
    out = sae(x, sparsity_scale=sparsity_scale, dead_mask=dead_mask)
    if penalty is not None:
        term = penalty(sae)
        out = ForwardOutput(out.x_hat, out.z, {**out.losses, "penalty": term, "total": out.losses["total"] + term})
    optimizer.zero_grad(set_to_none=True)
    out.losses["total"].backward()
    if sync_grads is not None:
        sync_grads(sae)
    sae.remove_parallel_decoder_grad_()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), max_grad_norm)
    optimizer.step()
    sae.normalize_decoder_()
    return ForwardOutput(out.x_hat.detach(), out.z.detach(), {k: v.detach() for k, v in out.losses.items()})


@dataclass(frozen=True)
class FitResult:
    losses: list[float]  # total loss per step
    final_l0: float
    final_fve: float


def fve(x: Tensor, x_hat: Tensor) -> float:
    """Pooled fraction of variance explained: 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²."""
    residual = (x - x_hat).pow(2).sum()
    total = (x - x.mean(dim=0)).pow(2).sum()
    return float(1 - residual / total)


def fit_in_memory(
    sae: SparseAutoencoder,
    data: Tensor,
    *,
    steps: int,
    batch_size: int = 256,
    lr: float = 1e-3,
    warmup_steps: int = 0,
    sparsity_warmup_steps: int = 0,
    dead_after_tokens: int | None = None,
    seed: int = 0,
) -> FitResult:
    """Train on random minibatches of `data` (N, d_in); for tests and synthetic experiments."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(sae, lr)
    tracker = DeadLatentTracker(sae.d_sae, dead_after_tokens or max(10 * batch_size, 1))
    sae.init_b_dec_(data[: min(len(data), 4096)])
    losses: list[float] = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, warmup_steps, steps)
        batch = data[torch.randint(0, len(data), (batch_size,), generator=generator)]
        dead = tracker.dead_mask()
        out = train_step(sae, optimizer, batch, sparsity_scale=sparsity_factor(step, sparsity_warmup_steps),
                         dead_mask=dead)
        tracker.update(out.z)
        if bool(dead.any()) and sae.reset_dead_(dead):
            tracker.revived(dead)
        loss = float(out.losses["total"])
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {step}")
        losses.append(loss)
    with torch.no_grad():
        z = sae.encode(data)
        final = FitResult(losses, float(l0(z).float().mean()), fve(data, sae.decode(z)))
    return final
