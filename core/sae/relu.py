"""ReLU SAE: the classic L1-penalised baseline (docs/methods.md §B.4).

z = ReLU(W_encᵀ(x − b_dec) + b_enc); loss = ‖x − x̂‖² + λ Σ_i z_i‖d_i‖.
The L1 term is weighted by each decoder row's norm so that the penalty cannot be dodged by shrinking
z and growing the row; with rows held at unit norm it equals plain L1, but the formula stays correct
for a trainer that does not renormalise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.sae.base import ForwardOutput, SparseAutoencoder


class ReLUSAE(SparseAutoencoder):
    architecture = "relu"

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu(self.pre_activation(x))  # (N, d_sae)

    def forward(self, x: Tensor, *, sparsity_scale: float = 1.0, dead_mask: Tensor | None = None) -> ForwardOutput:
        z = self.encode(x)  # (N, d_sae)
        x_hat = self.decode(z)  # (N, d_in)
        mse = self.mse(x, x_hat)
        sparsity = (z * self.W_dec.norm(dim=1)).sum(dim=-1).mean()  # mean over tokens of Σ_i z_i‖d_i‖
        total = mse + sparsity_scale * self.cfg.sparsity_coefficient * sparsity
        return ForwardOutput(x_hat, z, {"mse": mse, "sparsity": sparsity, "total": total})
