"""Straight-through estimators for thresholded activations (JumpReLU family, rectangle kernel).

Pseudo-derivatives (Rajamanoharan et al. 2024b; docs/methods.md §B.4), with K(u) = 1[|u| < 1/2]
and bandwidth ε:
    JumpReLU_θ(π) = π·H(π − θ):  ∂/∂π := H(π − θ),  ∂/∂θ := −(θ/ε)·K((π − θ)/ε)
    H(π − θ) (for the L0 penalty): ∂/∂π := 0,      ∂/∂θ := −(1/ε)·K((π − θ)/ε)
The Bi-JumpReLU of SA-GSAE applies the same rules to |π| (see `bi_jumprelu`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold).to(grad.dtype)
        grad_threshold = grad * (-(threshold / eps) * rectangle((pre - threshold) / eps))
        return grad_pre, grad_threshold.sum_to_size(threshold.shape), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = grad * (-(1.0 / eps) * rectangle((pre - threshold) / eps))
        return torch.zeros_like(pre), grad_threshold.sum_to_size(threshold.shape), None


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """π·H(π − θ) with the STE above; `threshold` (d_sae,) broadcasts over (N, d_sae)."""
    return _JumpReLU.apply(pre, threshold, bandwidth)


def step(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """H(π − θ) with the STE above: its gradient trains θ only (for an L0 penalty)."""
    return _Step.apply(pre, threshold, bandwidth)


def bi_jumprelu(pre: Tensor, threshold_pos: Tensor, threshold_neg: Tensor, bandwidth: float) -> Tensor:
    """Bi-JumpReLU: π·1[π > θ⁺] + π·1[π < −θ⁻]; one latent carries both signs along one direction."""
    return jumprelu(pre, threshold_pos, bandwidth) - jumprelu(-pre, threshold_neg, bandwidth)


def bi_step(pre: Tensor, threshold_pos: Tensor, threshold_neg: Tensor, bandwidth: float) -> Tensor:
    """1[π > θ⁺] + 1[π < −θ⁻]: the two-sided gate, for a two-sided L0 penalty."""
    return step(pre, threshold_pos, bandwidth) + step(-pre, threshold_neg, bandwidth)


class _SignAwareCode(torch.autograd.Function):
    """SA-GSAE's gate, magnitude, code, Bi-JumpReLU and sparsity column sums in a few (N, H) passes, with the
    straight-through rules above written out in one backward (core/sae/sa_gsae.py has the equations)."""

    @staticmethod
    def forward(ctx: Any, projected: Tensor, b_gate: Tensor, r_pos: Tensor, r_neg: Tensor, b_mag: Tensor,
                theta_pos: Tensor, theta_neg: Tensor, bandwidth: float, penalty: str,
                with_phi: bool) -> tuple[Tensor, Tensor, Tensor]:
        pi, scale, above, below, gate, keep, magnitude = _sign_aware_parts(projected, b_gate, r_pos, r_neg, b_mag,
                                                                           theta_pos, theta_neg)
        z = torch.where(keep, magnitude, 0.0)  # (N, H), signed
        phi = torch.where(gate, pi, 0.0) if with_phi else pi.new_zeros(())  # Bi-JumpReLU(π)
        # Per latent, Σ_n |φ(π)| (l1: JumpReLU_θ⁺(π) + JumpReLU_θ⁻(−π)) or Σ_n g (l0): (H,)
        column = torch.where(gate, pi.abs(), 0.0).sum(0) if penalty == "l1" else gate.sum(0, dtype=pi.dtype)
        ctx.save_for_backward(projected, pi, scale, magnitude, above, below, keep, theta_pos, theta_neg)
        ctx.tied = r_pos is r_neg
        ctx.bandwidth, ctx.penalty = bandwidth, penalty
        return z, phi, column

    @staticmethod
    def backward(ctx: Any, grad_z: Tensor, grad_phi: Tensor, grad_column: Tensor) -> tuple[Tensor | None, ...]:
        projected, pi, scale, magnitude, above, below, keep, theta_pos, theta_neg = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_mu = torch.where(keep, grad_z, 0.0)  # ∂z/∂μ = g·1[σμ > 0]; the gate passes none to π
        # ∂/∂π: the Bi-JumpReLU φ (aux), and the l1 sparsity term through ±JumpReLU (l0: none)
        plus = grad_phi + grad_column if ctx.penalty == "l1" else grad_phi  # grad_phi is () without φ
        minus = grad_phi - grad_column if ctx.penalty == "l1" else grad_phi
        grad_pi = torch.where(above, plus, torch.where(below, minus, 0.0))  # (N, H)
        grad_projected = torch.addcmul(grad_pi, grad_mu, scale)  # μ = e^{r^σ}·p + b_mag, π = p + b_gate
        grad_b_gate = grad_pi.sum(0)
        grad_b_mag = grad_mu.sum(0)
        grad_scaled = (grad_mu * projected).mul_(scale)  # ∂/∂r^σ, (N, H)
        if ctx.tied:
            grad_r_pos, grad_r_neg = grad_scaled.sum(0), None
        else:
            positive = pi > 0
            grad_r_pos = torch.where(positive, grad_scaled, 0.0).sum(0)
            grad_r_neg = torch.where(positive, 0.0, grad_scaled).sum(0)
        # θ: rectangle-kernel STE, non-zero only within ε/2 of a threshold (a few entries)
        grad_theta_pos = _window_grad(pi - theta_pos, pi, magnitude, grad_z, grad_column, theta_pos, eps, ctx.penalty)
        grad_theta_neg = _window_grad(-pi - theta_neg, pi, magnitude, grad_z, grad_column, theta_neg, eps,
                                      ctx.penalty)
        return (grad_projected, grad_b_gate, grad_r_pos, grad_r_neg, grad_b_mag, grad_theta_pos, grad_theta_neg,
                None, None, None)


def _sign_aware_parts(projected: Tensor, b_gate: Tensor, r_pos: Tensor, r_neg: Tensor, b_mag: Tensor,
                      theta_pos: Tensor, theta_neg: Tensor) -> tuple[Tensor, ...]:
    """(π, e^{r^σ}, 1[π > θ⁺], 1[π < −θ⁻], gate, keep = gate·1[σμ > 0], μ), the (N, H) pieces of an SA-GSAE code."""
    pi = projected + b_gate  # (N, H)
    scale = r_pos.exp() if r_pos is r_neg else torch.where(pi > 0, r_pos.exp(), r_neg.exp())
    magnitude = scale * projected + b_mag  # μ, signed
    above, below = pi > theta_pos, pi < -theta_neg
    gate = above | below
    # σ·ReLU(σ·μ) is μ where π and μ share a sign and 0 elsewhere; inside the gate π ≠ 0.
    keep = gate & ((pi > 0) == (magnitude > 0)) & (magnitude != 0)
    return pi, scale, above, below, gate, keep, magnitude


def _window_grad(distance: Tensor, pi: Tensor, magnitude: Tensor, grad_z: Tensor, grad_column: Tensor,
                 theta: Tensor, eps: float, penalty: str) -> Tensor:
    """∂L/∂θ (H,) from the entries whose `distance` (π − θ⁺ or −π − θ⁻, (N, H), overwritten) lies inside the
    rectangle kernel: −(1/ε)·Σ_n (∂L/∂z·m + ∂L/∂S_i·(θ_i for l1, 1 for l0)), with m = σ·ReLU(σ·μ) ungated."""
    rows, cols = (distance.div_(eps).abs_() < 0.5).nonzero(as_tuple=True)  # usually a handful of entries
    p, mu = pi[rows, cols], magnitude[rows, cols]
    m = torch.where(((p > 0) == (mu > 0)) & (p != 0), mu, 0.0)
    per_entry = grad_z[rows, cols] * m + grad_column[cols] * (theta[cols] if penalty == "l1" else 1.0)
    return theta.new_zeros(theta.shape).index_add_(0, cols, per_entry).mul_(-1.0 / eps)


def sign_aware_code(projected: Tensor, b_gate: Tensor, r_pos: Tensor, r_neg: Tensor, b_mag: Tensor,
                    theta_pos: Tensor, theta_neg: Tensor, bandwidth: float, penalty: str,
                    with_phi: bool) -> tuple[Tensor, Tensor, Tensor]:
    """SA-GSAE's training quantities from the gate projection p = (x − b_dec) W_gate (N, H): the code z (N, H),
    the Bi-JumpReLU φ(π) (N, H) for the auxiliary reconstruction (a () zero unless `with_phi`; φ carries no
    gradient to θ), and the per-latent sparsity sums (H,), Σ_n |φ(π)| ("l1") or Σ_n g ("l0"). Pass the same
    tensor as r_pos and r_neg for tied magnitudes (and as θ⁺, θ⁻ for symmetric thresholds). Gradients are
    those of the `jumprelu` / `bi_step` formulation (tests/core/sae/test_gated_sa_gsae.py keeps it as the
    reference) in about a third of the (N, H) passes."""
    return _SignAwareCode.apply(projected, b_gate, r_pos, r_neg, b_mag, theta_pos, theta_neg, bandwidth, penalty,
                                with_phi)


def sign_aware_encode(projected: Tensor, b_gate: Tensor, r_pos: Tensor, r_neg: Tensor, b_mag: Tensor,
                      theta_pos: Tensor, theta_neg: Tensor) -> Tensor:
    """The code z alone (inference), computed exactly as `sign_aware_code` computes it: (N, H)."""
    parts = _sign_aware_parts(projected, b_gate, r_pos, r_neg, b_mag, theta_pos, theta_neg)
    return torch.where(parts[5], parts[6], 0.0)
