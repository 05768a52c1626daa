"""TopK SAE (Gao et al. 2024): exactly k active latents per token, plus the AuxK dead-latent loss.

Sparsity is set by construction (no λ), so the objective is reconstruction plus AuxK. `auxk_loss`
and `keep_top_k` are module functions because BatchTopK (core/sae/batchtopk.py) reuses them.

AuxK normalisation (a deliberate choice): the auxiliary term is ‖e − ê‖² summed over features and
averaged over tokens, in the same units as the reconstruction term, where e = x − x̂ (detached) and
ê = W_decᵀ z_aux uses the aux_k largest ReLU pre-activations among dead latents (no decoder bias).
This is the BatchTopK/MetaSAE form (docs/methods.md §D.1). sparsify divides both terms by the
same input variance, so `aux_k_coefficient` means the same there (default 1/32). We do not divide by
the residual's own power, as OpenAI's per-token normalised MSE does: that would give AuxK more weight
as reconstruction improves. We also do not scale by the number of dead latents.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from core.sae.base import ForwardOutput, SAEConfig, SparseAutoencoder
from core.sae.sparse_decode import (
    SparsePattern,
    active_pre_activations,
    sparse_decode,
    sparse_reconstruction,
    to_dense,
)


def keep_top_k(acts: Tensor, k: int) -> Tensor:
    """Zero all but the k largest entries of each row; gradients flow to the kept entries: (N, d_sae)."""
    k = min(k, acts.shape[-1])
    values, indices = acts.topk(k, dim=-1, sorted=False)  # (N, k)
    return torch.zeros_like(acts).scatter(-1, indices, values)


def latent_major_encoder_(sae: SparseAutoencoder) -> None:
    """Store W_enc (d_in, d_sae) latent by latent, as the transpose of a contiguous (d_sae, d_in) tensor. The
    sparse backward builds W_enc's gradient latent by latent, so with this layout autograd takes it as it is
    instead of copying it into a transposed layout every step. Shape, values and the saved format (the
    writers save contiguous copies) do not change; the encoder matmul runs equally fast either way."""
    sae.W_enc = nn.Parameter(sae.W_enc.detach().t().contiguous().t())


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


class TopKSAE(SparseAutoencoder):
    """z = TopK_k(ReLU(pre)): the k largest pre-activations of each token survive, the rest are 0.

    Whenever a token has at least k positive pre-activations, L0 is exactly k (true after any real
    training). Encoding does not depend on which other tokens share the batch.
    """

    architecture = "topk"
    sparse_codes = True

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        latent_major_encoder_(self)

    def encode(self, x: Tensor) -> Tensor:
        return keep_top_k(torch.relu(self.pre_activation(x)), self.cfg.k)  # (N, d_sae)

    def forward(self, x: Tensor, *, sparsity_scale: float = 1.0, dead_mask: Tensor | None = None) -> ForwardOutput:
        """Sparse training pass: decode and backpropagate through the k active latents per token only
        (core/sae/sparse_decode.py); the same losses and gradients as decoding the dense code."""
        with torch.no_grad():
            x_centered = x - self.b_dec  # (N, d_in)
            pre = torch.addmm(self.b_enc, x_centered, self.W_enc)  # (N, d_sae), = pre_activation(x), no graph
            # Top-k of π, then ReLU: the same code as top-k of ReLU(π) (a row with fewer than k positive entries
            # keeps other zeros), without a full ReLU pass.
            top, indices = pre.topk(min(self.cfg.k, self.d_sae), dim=-1, sorted=False)  # (N, k)
        pattern = SparsePattern.from_topk(indices, self.d_sae)
        return sparse_forward(self, x, x_centered, pre, top.reshape(-1).relu_(), pattern, dead_mask)


def sparse_forward(sae: SparseAutoencoder, x: Tensor, x_centered: Tensor, pre: Tensor, top: Tensor,
                   pattern: SparsePattern, dead_mask: Tensor | None) -> ForwardOutput:
    """Losses of a TopK-style SAE from its active entries: `pre` (N, d_sae) are the pre-activations (no
    graph), `top` (nnz,) the ReLU of them at `pattern`. Shared with BatchTopK."""
    values = active_pre_activations(x, sae.W_enc, sae.b_enc, sae.b_dec, x_centered, top, pattern)  # (nnz,)
    x_hat, mse = sparse_reconstruction(values, pattern, sae.W_dec, sae.b_dec, x)  # (N, d_in), ()
    aux = sparse_auxk_loss(sae, x, x_centered, pre, x_hat, dead_mask)
    total = mse + sae.cfg.aux_k_coefficient * aux
    return ForwardOutput(x_hat, to_dense(values, pattern), {"mse": mse, "aux": aux, "total": total})


def sparse_auxk_loss(sae: SparseAutoencoder, x: Tensor, x_centered: Tensor, pre: Tensor, x_hat: Tensor,
                     dead_mask: Tensor | None) -> Tensor:
    """`auxk_loss` through the active entries only: the top aux_k dead latents per token, (N, min(aux_k,
    n_dead)) entries, decoded sparsely; the same value and gradients."""
    aux_k = sae.cfg.aux_k
    if dead_mask is None or aux_k < 1 or not bool(dead_mask.any()):
        return x_hat.new_zeros(())
    dead = dead_mask.nonzero().squeeze(1)  # (n_dead,)
    with torch.no_grad():
        top, chosen = pre[:, dead].relu_().topk(min(aux_k, dead.numel()), dim=-1, sorted=False)  # (N, m)
    pattern = SparsePattern.from_topk(dead[chosen], sae.d_sae)
    values = active_pre_activations(x, sae.W_enc, sae.b_enc, sae.b_dec, x_centered, top.reshape(-1), pattern)
    e_hat = sparse_decode(values, pattern, sae.W_dec)  # (N, d_in)
    return ((x - x_hat).detach() - e_hat).pow(2).sum(dim=-1).mean()
