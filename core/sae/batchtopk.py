"""BatchTopK SAE (Bussmann, Leask, Nanda 2024; docs/methods.md §D.6).

Training keeps the B·k largest ReLU pre-activations of the whole batch, so the mean L0 is exactly k
but each token gets as many latents as it needs. That choice depends on the other tokens in the batch,
so inference uses one calibrated scalar threshold instead: z = π·1[π > threshold]. A token's code then
depends only on the token itself.

The threshold is a persistent buffer, so it is saved in the state_dict and travels with the weights.
- During training it is the exponential moving average (momentum `threshold_momentum`) of the
  smallest activation kept in each batch. The first updates are a plain running mean, so an early
  zero or a short run does not bias it.
- `calibrate_threshold_(x)` sets it exactly, so that the mean L0 on x is k.
The AuxK dead-latent loss is the TopK one (core/sae/topk.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

from core.sae.base import ForwardOutput, SAEConfig, SparseAutoencoder
from core.sae.sparse_decode import SparsePattern, sort_index
from core.sae.topk import auxk_loss, latent_major_encoder_, sparse_forward


def keep_batch_top_k(acts: Tensor, k: int) -> Tensor:
    """Zero all but the N·k largest entries of the whole (N, d_sae) batch; gradients reach the kept ones."""
    flat = acts.flatten()  # (N·d_sae,)
    values, indices = flat.topk(min(acts.shape[0] * k, flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter(0, indices, values).view_as(acts)  # (N, d_sae)


def batch_top_k_indices(acts: Tensor, k: int) -> Tensor:
    """Sorted flat indices of the N·k largest entries of (N, d_sae) `acts`, the set `keep_batch_top_k` keeps.

    Why two stages: one top-(N·k) over all N·d_sae entries is several times slower than a per-row top-m
    (m = 4k) followed by a top-(N·k) over the N·m candidates. The candidates hold the batch top-(N·k) whenever
    no row had all m of its candidates chosen (its (m+1)-th value then cannot beat the chosen ones); when one
    did, this falls back to the one-stage top-k.
    """
    n, width = acts.shape
    budget = min(n * k, n * width)
    m = 4 * k
    if m < width:
        candidates, columns = acts.topk(m, dim=-1, sorted=False)  # (N, m)
        chosen = candidates.reshape(-1).topk(budget, sorted=False).indices  # (N·k,) into the candidates
        rows = chosen.div(m, rounding_mode="floor")
        if int(torch.bincount(rows, minlength=n).max()) < m:
            return sort_index(rows * width + columns.reshape(-1)[chosen])
    return sort_index(acts.reshape(-1).topk(budget, sorted=False).indices)


class BatchTopKSAE(SparseAutoencoder):
    architecture = "batchtopk"
    sparse_codes = True
    threshold_momentum: ClassVar[float] = 0.99

    threshold: Tensor  # () inference threshold on the ReLU pre-activations
    threshold_updates: Tensor  # () training batches averaged into `threshold` so far (long)
    batch_cutoff: Callable[[Tensor, int], Tensor] | None = None
    """Set by data-parallel training (trainer/training/distributed.py): (acts, k) -> the smallest value kept by the
    top-k over the GLOBAL batch across ranks, () (0: none positive); training then keeps acts >= it."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        latent_major_encoder_(self)
        self.register_buffer("threshold", torch.zeros(()), persistent=True)
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long), persistent=True)

    def encode(self, x: Tensor) -> Tensor:
        """Inference codes: π·1[π > threshold] with π ≥ 0. Before any training or calibration the threshold is 0,
        so this is the plain ReLU."""
        pre = torch.relu(self.pre_activation(x))  # (N, d_sae)
        return pre * (pre > self.threshold).to(pre.dtype)

    def forward(self, x: Tensor, *, sparsity_scale: float = 1.0, dead_mask: Tensor | None = None) -> ForwardOutput:
        """In training mode, batch top-k (and a threshold update), decoded and backpropagated through the kept
        entries only (core/sae/sparse_decode.py); in eval mode, the inference encoder with a dense decode."""
        if not self.training:
            return self._dense_forward(x, dead_mask)
        with torch.no_grad():
            x_centered = x - self.b_dec  # (N, d_in)
            pre = torch.addmm(self.b_enc, x_centered, self.W_enc)  # (N, d_sae), = pre_activation(x), no graph
            # Selecting on π rather than ReLU(π) keeps the same positive entries; where fewer than N·k are
            # positive it keeps other zeros after the ReLU, which the code cannot tell apart.
            if self.batch_cutoff is not None:
                cutoff = self.batch_cutoff(pre, self.cfg.k)  # ()
                # What the global batch top-k keeps here (zeros add nothing, so they are left out).
                pattern = SparsePattern.from_mask((pre >= cutoff) & (pre > 0))
                self._update_threshold_(cutoff.reshape(1))  # the smallest value kept across ranks
                top = pattern.gather(pre)  # (nnz,)
            else:
                pattern = SparsePattern.from_flat(batch_top_k_indices(pre, self.cfg.k), *pre.shape)
                top = pattern.gather(pre).relu_()  # (N·k,)
                self._update_threshold_(top)
        return sparse_forward(self, x, x_centered, pre, top, pattern, dead_mask)

    def _dense_forward(self, x: Tensor, dead_mask: Tensor | None) -> ForwardOutput:
        acts = torch.relu(self.pre_activation(x))  # (N, d_sae)
        z = acts * (acts > self.threshold).to(acts.dtype)
        x_hat = self.decode(z)  # (N, d_in)
        mse = self.mse(x, x_hat)
        aux = auxk_loss(acts, x - x_hat, self.W_dec, dead_mask, self.cfg.aux_k)
        total = mse + self.cfg.aux_k_coefficient * aux
        return ForwardOutput(x_hat, z, {"mse": mse, "aux": aux, "total": total})

    @torch.no_grad()
    def _update_threshold_(self, z: Tensor) -> None:
        kept = z[z > 0]
        if kept.numel() == 0:
            return
        smallest = kept.min().to(self.threshold.dtype)
        rate = max(1.0 / (int(self.threshold_updates) + 1), 1.0 - self.threshold_momentum)
        self.threshold.lerp_(smallest, rate)
        self.threshold_updates += 1

    @torch.no_grad()
    def calibrate_threshold_(self, x: Tensor, chunk_size: int = 4096) -> float:
        """Set the threshold so that the mean L0 of `encode` on x (N, d_in) is k; returns it.

        The threshold is halfway between the N·k-th and (N·k+1)-th largest ReLU pre-activations over x,
        so exactly N·k values exceed it (barring ties), robust to rounding differences between batchings.
        Memory is O(N·k + chunk_size·d_sae): only the running top N·k+1 values are kept.
        """
        budget = x.shape[0] * self.cfg.k
        best = x.new_empty(0)  # running top values, (≤ budget + 1,)
        for start in range(0, x.shape[0], chunk_size):
            acts = torch.relu(self.pre_activation(x[start : start + chunk_size])).flatten()
            candidates = torch.cat([best, acts])
            best = candidates.topk(min(budget + 1, candidates.numel())).values  # sorted, descending
        # With no more than N·k values in all, every positive one may fire.
        value = 0.0 if best.numel() <= budget else float((best[budget - 1] + best[budget]) / 2)
        self.threshold.fill_(value)
        self.threshold_updates.clamp_(min=1)  # further training averages into the calibrated value
        return value
