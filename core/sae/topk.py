"""TopK SAE (Gao et al. 2024): exactly k active latents per token, plus the AuxK dead-latent loss.

Sparsity is set by construction (no λ), so the objective is reconstruction plus AuxK. `auxk_loss`
and `keep_top_k` are module functions because BatchTopK (core/sae/batchtopk.py) reuses them.

AuxK normalisation (a deliberate choice): the auxiliary term is ‖e − ê‖² summed over features and
averaged over tokens, in the same units as the reconstruction term, where e = x − x̂ (detached) and
ê = W_decᵀ z_aux uses the aux_k largest ReLU pre-activations among dead latents (no decoder bias).
This is the BatchTopK/MetaSAE form (reference/methods.md §D.1). sparsify divides both terms by the
same input variance, so `aux_k_coefficient` means the same there (default 1/32). We do not divide by
the residual's own power, as OpenAI's per-token normalised MSE does: that would give AuxK more weight
as reconstruction improves. We also do not scale by the number of dead latents.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.sae.base import ForwardOutput, SparseAutoencoder, register


def keep_top_k(acts: Tensor, k: int) -> Tensor:
    """Zero all but the k largest entries of each row; gradients flow to the kept entries: (N, d_sae)."""
    k = min(k, acts.shape[-1])
    values, indices = acts.topk(k, dim=-1, sorted=False)  # (N, k)
    return torch.zeros_like(acts).scatter(-1, indices, values)


def auxk_loss(acts: Tensor, residual: Tensor, W_dec: Tensor, dead_mask: Tensor | None, aux_k: int) -> Tensor:
    """AuxK: how well the top `aux_k` dead latents reconstruct the main residual.

    acts (N, d_sae) are the non-negative (ReLU) pre-activations, residual (N, d_in) is x − x̂ and is
    detached here, W_dec is (d_sae, d_in), dead_mask (d_sae,) is bool. The result is 0 when no latent is
    dead. Its gradient reaches the dead latents' encoder columns and decoder rows only, and moves them
    towards what the live latents miss.
    """
    if dead_mask is None or aux_k < 1 or not bool(dead_mask.any()):
        return acts.new_zeros(())
    dead = dead_mask.nonzero().squeeze(1)  # (n_dead,)
    z_aux = keep_top_k(acts[:, dead], aux_k)  # (N, n_dead)
    e_hat = z_aux @ W_dec[dead]  # (N, d_in)
    return (residual.detach() - e_hat).pow(2).sum(dim=-1).mean()


@register
class TopKSAE(SparseAutoencoder):
    """z = TopK_k(ReLU(pre)): the k largest pre-activations of each token survive, the rest are 0.

    Whenever a token has at least k positive pre-activations, L0 is exactly k (true after any real
    training). Encoding does not depend on which other tokens share the batch.
    """

    architecture = "topk"

    def encode(self, x: Tensor) -> Tensor:
        return keep_top_k(torch.relu(self.pre_activation(x)), self.cfg.k)  # (N, d_sae)

    def forward(self, x: Tensor, *, sparsity_scale: float = 1.0, dead_mask: Tensor | None = None) -> ForwardOutput:
        acts = torch.relu(self.pre_activation(x))  # (N, d_sae)
        z = keep_top_k(acts, self.cfg.k)  # (N, d_sae)
        x_hat = self.decode(z)  # (N, d_in)
        mse = self.mse(x, x_hat)
        aux = auxk_loss(acts, x - x_hat, self.W_dec, dead_mask, self.cfg.aux_k)
        total = mse + self.cfg.aux_k_coefficient * aux
        return ForwardOutput(x_hat, z, {"mse": mse, "aux": aux, "total": total})
