"""JumpReLU SAE (Rajamanoharan et al. 2024b; docs/methods.md §B.4, §E.3).

z = π·H(π − θ) with a learned threshold θ per latent; loss = ‖x − x̂‖² + λ Σ_i H(π_i − θ_i).
The L0 term is trained through the rectangle-kernel straight-through estimators in core/sae/ste.py:
- the L0 term moves θ only, and gives no gradient to π or the encoder;
- reconstruction moves θ through the JumpReLU pseudo-derivative, and moves π through the gate.

θ is parameterised directly, as SAELens and dictionary_learning do; they report poor results with
log θ. θ must stay positive, or negative π would leak through as negative codes. This is kept by
projection: `normalize_decoder_`, which train_step calls after every optimiser step, also clamps θ to
at least `min_threshold`. The forward pass and `encode` additionally use θ.clamp_min(min_threshold)
as a guard for a θ set by other means.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from core.sae.base import ForwardOutput, SAEConfig, SparseAutoencoder
from core.sae.ste import jumprelu, step


class JumpReLUSAE(SparseAutoencoder):
    architecture = "jumprelu"
    min_threshold: ClassVar[float] = 1e-6

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), cfg.threshold_init))  # (d_sae,)

    def effective_threshold(self) -> Tensor:
        return self.threshold.clamp_min(self.min_threshold)  # (d_sae,)

    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_activation(x)  # (N, d_sae)
        return pre * (pre > self.effective_threshold()).to(pre.dtype)

    def forward(self, x: Tensor, *, sparsity_scale: float = 1.0, dead_mask: Tensor | None = None) -> ForwardOutput:
        pre = self.pre_activation(x)  # (N, d_sae)
        theta = self.effective_threshold()  # (d_sae,)
        z = jumprelu(pre, theta, self.cfg.bandwidth)  # (N, d_sae)
        x_hat = self.decode(z)  # (N, d_in)
        mse = self.mse(x, x_hat)
        sparsity = step(pre, theta, self.cfg.bandwidth).sum(dim=-1).mean()  # STE L0 per token
        total = mse + sparsity_scale * self.cfg.sparsity_coefficient * sparsity
        return ForwardOutput(x_hat, z, {"mse": mse, "sparsity": sparsity, "total": total})

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Post-step upkeep: unit decoder rows, and θ projected back to ≥ `min_threshold`."""
        super().normalize_decoder_()
        self.threshold.clamp_(min=self.min_threshold)

    @torch.no_grad()
    def reset_dead_(self, dead_mask: Tensor) -> int:
        """Put the thresholds of dead latents back to θ₀, so any positive pre-activation above it fires again."""
        self.threshold[dead_mask] = self.cfg.threshold_init
        return int(dead_mask.sum())
