"""Straight-through estimators for thresholded activations (JumpReLU family, rectangle kernel).

Pseudo-derivatives (Rajamanoharan et al. 2024b; reference/methods.md §B.4), with K(u) = 1[|u| < 1/2]
and bandwidth ε:
    JumpReLU_θ(π) = π·H(π − θ):  ∂/∂π := H(π − θ),  ∂/∂θ := −(θ/ε)·K((π − θ)/ε)
    H(π − θ) (for the L0 penalty): ∂/∂π := 0,      ∂/∂θ := −(1/ε)·K((π − θ)/ε)
The Bi-JumpReLU of SA-GSAE applies the same rules to |π| (see `bi_jumprelu`).
"""

from __future__ import annotations

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
