"""SAE evaluation metrics on tensors (definitions: docs/methods.md §E.1).

All reconstruction metrics are computed in the stage's input space (activations times the stage's
input scale, so E‖x‖² = d). FVE is reported both pooled, 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖², and per token,
mean_t(1 − ‖x_t − x̂_t‖² / ‖x_t − x̄‖²), because papers use both.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.sae.base import l0


class ReconstructionAccumulator:
    """Streams batches of (x, x̂, z) and reports FVE, MSE, cosine, L0, shrinkage and density metrics."""

    def __init__(self, d_sae: int) -> None:
        self.fire_counts = torch.zeros(d_sae, dtype=torch.float64)
        self.n = 0
        self._sums: dict[str, float] = {}
        self._x_sum: Tensor | None = None  # Σ x (d,), for the pooled variance
        self._x_sq = 0.0  # Σ ‖x‖²
        self._per_token_ratio: list[Tensor] = []  # ‖x − x̂‖² per token, kept for the per-token FVE
        self._x_tokens: list[Tensor] = []

    def _add(self, key: str, value: Tensor) -> None:
        self._sums[key] = self._sums.get(key, 0.0) + float(value.double().sum())

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, z: Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()  # (N, d)
        err = (x - x_hat).pow(2).sum(dim=-1)  # (N,)
        self._add("sq_err", err)
        self._add("l0", l0(z))
        self._add("cosine", torch.nn.functional.cosine_similarity(x, x_hat, dim=-1))
        self._add("norm_ratio", x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12))
        self._add("xhat_sq", x_hat.pow(2).sum(dim=-1))
        self._add("x_dot_xhat", (x * x_hat).sum(dim=-1))
        self.fire_counts += (z != 0).sum(dim=0).double().cpu()
        self._x_sum = x.sum(dim=0) if self._x_sum is None else self._x_sum + x.sum(dim=0)
        self._x_sq += float(x.pow(2).sum())
        self._per_token_ratio.append(err.cpu())
        self._x_tokens.append(x.cpu())
        self.n += x.shape[0]

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no tokens were evaluated")
        n = self.n
        mean = self._x_sum / n  # (d,)
        total_var = self._x_sq - n * float(mean.pow(2).sum())  # Σ‖x − x̄‖²
        per_token_var = torch.cat([(x - mean.cpu()).pow(2).sum(dim=-1) for x in self._x_tokens])  # (n,)
        per_token = 1 - torch.cat(self._per_token_ratio) / per_token_var.clamp_min(1e-12)
        density = self.fire_counts / n
        return {
            "tokens": n,
            "fve": 1 - self._sums["sq_err"] / total_var,
            "fve_per_token": float(per_token.mean()),
            "mse": self._sums["sq_err"] / n,
            "cosine": self._sums["cosine"] / n,
            "l0": self._sums["l0"] / n,
            "shrinkage": self._sums["norm_ratio"] / n,
            "relative_reconstruction_bias": self._sums["xhat_sq"] / self._sums["x_dot_xhat"],
            "dead_fraction": float((density == 0).double().mean()),
            "dense_fraction_1pct": float((density > 0.01).double().mean()),
            "dense_fraction_10pct": float((density > 0.10).double().mean()),
        }


class NextTokenScorer:
    """CE and KL-to-clean of next-token predictions at the positions whose target is real.

    The clean log-probabilities are computed once per batch and restricted to scored positions, so
    each variant (spliced, ablated) costs one log-softmax over (M, vocab), not several over the batch.
    """

    def __init__(self, clean_logits: Tensor, input_ids: Tensor, mask: Tensor) -> None:
        self.valid = mask[:, 1:].bool()  # (B, T-1): position t predicts token t+1
        self.targets = input_ids[:, 1:][self.valid]  # (M,)
        self.clean_log_probs = self._log_probs(clean_logits)  # (M, V)
        self.clean_probs = self.clean_log_probs.exp()

    def _log_probs(self, logits: Tensor) -> Tensor:
        return torch.log_softmax(logits[:, :-1][self.valid].float(), dim=-1)  # (M, V)

    @property
    def positions(self) -> int:
        return int(self.targets.numel())

    def clean_ce(self) -> Tensor:
        return -self.clean_log_probs.gather(-1, self.targets[:, None]).squeeze(-1)  # (M,)

    def score(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """(CE (M,), KL(p_clean ‖ p) (M,)) of another forward pass over the same batch."""
        log_probs = self._log_probs(logits)
        ce = -log_probs.gather(-1, self.targets[:, None]).squeeze(-1)
        kl = (self.clean_probs * (self.clean_log_probs - log_probs)).sum(dim=-1)
        return ce, kl


def ce_loss_recovered(ce_clean: float, ce_spliced: float, ce_zero: float) -> float:
    """(H₀ − H*) / (H₀ − H_orig): 1 when splicing costs nothing, 0 when it is as bad as zero-ablation."""
    denominator = ce_zero - ce_clean
    return float("nan") if abs(denominator) < 1e-12 else (ce_zero - ce_spliced) / denominator
