"""SA-GSAE: sign-aware gated SAE with Bi-JumpReLU (Wieciech et al. 2026; docs/methods.md §B.2).

Why: a concept that appears with either sign along one direction (x = ±a·d) costs a non-negative SAE two
latents (d and −d). SA-GSAE gives each latent a two-sided gate and a signed magnitude, so one latent, one
decoder row, carries both poles. Codes are therefore signed; every consumer treats them so (L0 counts z ≠ 0,
top-k ranks by |z|).

Equations (per latent i; H = d_sae, ε = cfg.bandwidth, s = the sparsity warm-up scale, λ =
cfg.sparsity_coefficient, sg = stop-gradient):

    x̃    = x − b_dec
    p    = x̃ W_gate                                  (W_gate is `W_enc`)
    π    = p + b_gate                                 (b_gate is `b_enc`)
    θ⁺, θ⁻ = threshold_pos, threshold_neg             (one shared `threshold` unless cfg.per_side_thresholds;
                                                      kept ≥ min_threshold by projection after every step)
    g    = H(π − θ⁺) + H(−π − θ⁻)                     two-sided gate, ∈ {0, 1}
    σ    = sign(π)
    r^σ  = r⁺ where π > 0 else r⁻                     (one `r_mag` for both unless not cfg.tied_magnitude)
    μ    = exp(r^σ)·p + b_mag                          = x̃ (exp(r^σ) ⊙ W_gate) + b_mag, signed
    m    = σ·ReLU(σ·μ)                                 sign-consistent magnitude: the gate picks the pole
    z    = g·m                                         signed code
    x̂    = z W_dec + b_dec

    φ(π) = π·1[π > θ⁺] + π·1[π < −θ⁻]                 Bi-JumpReLU of the gate pre-activation
    L    = ‖x − x̂‖²
         + s·λ·S                                                 (losses["sparsity"] is S, unscaled)
         + ‖x − (φ_{sg(θ)}(π) sg(W_dec) + sg(b_dec))‖²          (only when cfg.aux_reconstruction)

    S    = Σ_i ‖d_i‖·|φ(π)_i|  = Σ_i ‖d_i‖·(JumpReLU_θ⁺(π_i) + JumpReLU_θ⁻(−π_i))   default "l1"
    S    = Σ_i g_i                                                                  option  "l0"

Straight-through estimators (core.sae.ste, rectangle kernel K(u) = 1[|u| < ½]):
    ∂g/∂π := 0,  ∂g/∂θ⁺ := −(1/ε)·K((π − θ⁺)/ε),  ∂g/∂θ⁻ := −(1/ε)·K((−π − θ⁻)/ε)
    ∂JumpReLU_θ(u)/∂u := H(u − θ),  ∂JumpReLU_θ(u)/∂θ := −(θ/ε)·K((u − θ)/ε)
So θ learns from the reconstruction through z = g·m (∂z/∂θ⁺ := −(m/ε)·K(·), which is JumpReLU's rule with the
magnitude m in place of π) and from the sparsity term (both S above pass the kernel gradient to θ, pushing it
up); the gate encoder (W_gate, b_gate) learns from the L1 term and from the auxiliary reconstruction, whose
frozen decoder and detached θ make it a signal for the gate path only; W_gate also learns through the
magnitude path, which shares its directions. Without the auxiliary term nothing but the magnitude path holds
the scale of π, so the L1 penalty shrinks |π| while exp(r) grows to keep the magnitudes (gate collapse; in the
synthetic ablation test exp(r) ≈ 15 and the surplus latents end below θ₀, dead; the paper reports 98% dead on
LLM activations). Thresholds start small (cfg.threshold_init) and `reset_dead_` returns the thresholds of dead
latents to that value.

Why the L1 default: it is the two-sided mirror of the Gated SAE's ‖ReLU(π_gate)‖₁ (the paper's "two-sided
gated sparsity"), and it gives the gate encoder a sparsity gradient; the L0 form trains only θ.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from core.sae.base import ForwardOutput, SAEConfig, SparseAutoencoder
from core.sae.ste import sign_aware_code, sign_aware_encode

SparsityPenalty = Literal["l1", "l0"]


class SignAwareGatedSAE(SparseAutoencoder):
    """One signed latent per bipolar concept: two-sided learned-threshold gate × signed magnitude path."""

    architecture = "sa_gsae"
    signed = True
    min_threshold: ClassVar[float] = 1e-6

    def __init__(self, cfg: SAEConfig, *, sparsity_penalty: SparsityPenalty = "l1") -> None:
        """`sparsity_penalty` only changes the training loss, not the codes, so it is not part of the config."""
        super().__init__(cfg)
        if sparsity_penalty not in ("l1", "l0"):
            raise ValueError(f"sparsity_penalty must be 'l1' or 'l0', got {sparsity_penalty!r}")
        self.sparsity_penalty: SparsityPenalty = sparsity_penalty
        h = cfg.d_sae
        if cfg.tied_magnitude:
            self.r_mag = nn.Parameter(torch.zeros(h))  # (d_sae,) log-scale shared by both polarities
        else:
            self.r_mag_pos = nn.Parameter(torch.zeros(h))  # (d_sae,)
            self.r_mag_neg = nn.Parameter(torch.zeros(h))  # (d_sae,)
        self.b_mag = nn.Parameter(torch.zeros(h))  # (d_sae,)
        if cfg.per_side_thresholds:
            self.threshold_pos = nn.Parameter(torch.full((h,), cfg.threshold_init))  # (d_sae,)
            self.threshold_neg = nn.Parameter(torch.full((h,), cfg.threshold_init))  # (d_sae,)
        else:
            self.threshold = nn.Parameter(torch.full((h,), cfg.threshold_init))  # (d_sae,)

    def thresholds(self) -> tuple[Tensor, Tensor]:
        """(θ⁺, θ⁻), each (d_sae,); the same tensor twice when thresholds are symmetric.

        The clamp only guards against a θ set by other means: `normalize_decoder_` projects after each step.
        """
        if self.cfg.per_side_thresholds:
            return self.threshold_pos.clamp_min(self.min_threshold), self.threshold_neg.clamp_min(self.min_threshold)
        theta = self.threshold.clamp_min(self.min_threshold)
        return theta, theta

    def _threshold_params(self) -> tuple[nn.Parameter, ...]:
        if self.cfg.per_side_thresholds:
            return self.threshold_pos, self.threshold_neg
        return (self.threshold,)

    def _log_scales(self, pi: Tensor) -> Tensor:
        """r^σ per token and latent: (N, d_sae), or (d_sae,) when tied."""
        if self.cfg.tied_magnitude:
            return self.r_mag
        return torch.where(pi > 0, self.r_mag_pos, self.r_mag_neg)

    def _gate_and_magnitude(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(π, m): the gate pre-activation and the sign-consistent (ungated) magnitude, both (N, d_sae); the
        step computes them fused, this spells them out for inspection."""
        projected = (x - self.b_dec) @ self.W_enc  # (N, d_sae)
        pi = projected + self.b_enc
        mu = self._log_scales(pi).exp() * projected + self.b_mag  # (N, d_sae), signed
        sign = torch.sign(pi)
        return pi, sign * torch.relu(sign * mu)

    def _log_scale_params(self) -> tuple[Tensor, Tensor]:
        """(r⁺, r⁻), each (d_sae,); the same tensor twice when tied."""
        if self.cfg.tied_magnitude:
            return self.r_mag, self.r_mag
        return self.r_mag_pos, self.r_mag_neg

    def encode(self, x: Tensor) -> Tensor:
        projected = (x - self.b_dec) @ self.W_enc  # (N, d_sae)
        return sign_aware_encode(projected, self.b_enc, *self._log_scale_params(), self.b_mag, *self.thresholds())

    def forward(self, x: Tensor, *, sparsity_scale: float = 1.0, dead_mask: Tensor | None = None) -> ForwardOutput:
        """The losses above; gate, magnitude, Bi-JumpReLU and their straight-through gradients run fused
        (`core.sae.ste.sign_aware_code`), a few (N, d_sae) passes instead of dozens."""
        projected = (x - self.b_dec) @ self.W_enc  # (N, d_sae)
        z, phi, column = sign_aware_code(projected, self.b_enc, *self._log_scale_params(), self.b_mag,
                                         *self.thresholds(), self.cfg.bandwidth, self.sparsity_penalty,
                                         self.cfg.aux_reconstruction)  # (N, d_sae), (N, d_sae), (d_sae,)
        x_hat = self.decode(z)
        mse = self.mse(x, x_hat)
        if self.sparsity_penalty == "l1":  # mean over tokens of Σ_i ‖d_i‖·|φ(π)_i|
            penalty = (column * self.W_dec.norm(dim=1)).sum() / x.shape[0]
        else:  # mean over tokens of Σ_i g_i
            penalty = column.sum() / x.shape[0]
        if self.cfg.aux_reconstruction:
            aux = self.mse(x, phi @ self.W_dec.detach() + self.b_dec.detach())
        else:
            aux = mse.new_zeros(())
        total = mse + sparsity_scale * self.cfg.sparsity_coefficient * penalty + aux
        return ForwardOutput(x_hat, z, {"mse": mse, "sparsity": penalty, "aux": aux, "total": total})

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Post-step upkeep: unit decoder rows, and θ projected back to ≥ `min_threshold` (a θ ≤ 0 would fire
        both sides of the gate at once)."""
        super().normalize_decoder_()
        for theta in self._threshold_params():
            theta.clamp_(min=self.min_threshold)

    @torch.no_grad()
    def reset_dead_(self, dead_mask: Tensor) -> int:
        """Return the thresholds of dead latents to θ₀ so a grown threshold cannot keep them silent."""
        for theta in self._threshold_params():
            theta[dead_mask] = self.cfg.threshold_init
        return int(dead_mask.sum())
