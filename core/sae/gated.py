"""Gated SAE (Rajamanoharan et al. 2024, arXiv 2404.16014; docs/methods.md §B.4).

Why gated: an L1 penalty on the codes themselves shrinks every active magnitude. Here a *gate* path decides
which latents fire and carries the L1 penalty, while a *magnitude* path, sharing the gate's directions
(W_mag = exp(r_mag) ⊙ W_gate), decides how much, free of shrinkage:

    x̃      = x − b_dec
    π_gate = x̃ W_gate + b_gate                     (W_gate is `W_enc`, b_gate is `b_enc`)
    f_gate = 1[π_gate > 0]
    π_mag  = x̃ (exp(r_mag) ⊙ W_gate) + b_mag = exp(r_mag)·(π_gate − b_gate) + b_mag
    z      = f_gate · ReLU(π_mag)
    x̂      = z W_dec + b_dec
    L      = ‖x − x̂‖² + s·λ Σ_i ReLU(π_gate,i)·‖d_i‖ + ‖x − (ReLU(π_gate) sg(W_dec) + sg(b_dec))‖²

with s the sparsity warm-up scale. The Heaviside gate has no gradient, so the last (auxiliary) term, through a
frozen decoder, is what gives W_gate and b_gate a reconstruction signal; it is switched by
`cfg.aux_reconstruction` (off only for ablations). As in the other architectures, losses["sparsity"] is the
unscaled penalty (Σ_i ReLU(π_gate,i)‖d_i‖ per token) and losses["total"] applies s·λ to it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from core.sae.base import ForwardOutput, SAEConfig, SparseAutoencoder


class GatedSAE(SparseAutoencoder):
    """Gate path (W_enc, b_enc) picks the support; magnitude path (exp(r_mag) ⊙ W_enc, b_mag) sets values."""

    architecture = "gated"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae))  # (d_sae,) log-scale of the magnitude path
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))  # (d_sae,)

    def _paths(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(π_gate, π_mag), both (N, d_sae); the magnitude path reuses the gate's projection."""
        projected = (x - self.b_dec) @ self.W_enc  # (N, d_sae)
        pi_gate = projected + self.b_enc
        pi_mag = projected * self.r_mag.exp() + self.b_mag
        return pi_gate, pi_mag

    def encode(self, x: Tensor) -> Tensor:
        pi_gate, pi_mag = self._paths(x)
        return (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)  # (N, d_sae)

    def forward(self, x: Tensor, *, sparsity_scale: float = 1.0, dead_mask: Tensor | None = None) -> ForwardOutput:
        pi_gate, pi_mag = self._paths(x)
        gate_act = torch.relu(pi_gate)  # (N, d_sae)
        z = (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)  # (N, d_sae); the gate passes no gradient
        x_hat = self.decode(z)
        mse = self.mse(x, x_hat)
        decoder_norms = self.W_dec.norm(dim=1)  # (d_sae,)
        sparsity = (gate_act * decoder_norms).sum(dim=-1).mean()  # mean over tokens of Σ_i ReLU(π_gate,i)‖d_i‖
        if self.cfg.aux_reconstruction:
            x_hat_gate = gate_act @ self.W_dec.detach() + self.b_dec.detach()  # (N, d_in)
            aux = self.mse(x, x_hat_gate)
        else:
            aux = mse.new_zeros(())
        total = mse + sparsity_scale * self.cfg.sparsity_coefficient * sparsity + aux
        losses = {"mse": mse, "sparsity": sparsity, "aux": aux, "total": total}
        return ForwardOutput(x_hat, z, losses)
