"""Closed-form ridge affine predictor between two hookpoints, for ReSAE stacks (docs/methods.md §A.2, §A.5).

A ReSAE stage m+1 trains on the scaled residual r = s·(h_{m+1} − A h_m − c) and maps back with
ĥ_{m+1} = A h_m + c + r̂ / s. The map (A, c) is fitted once, before SAE training, from streamed float64
sufficient statistics, so calibration data never has to fit in memory, and the ridge strength is chosen
by held-out R² computed from a second accumulator's moments (no second pass over the data).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from core.stack.affine import AffineMap

DEFAULT_ALPHAS: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
_PINV_RTOL = 1e-10  # α = 0: eigenvalues of C_xx below this fraction of the largest are treated as zero


class MomentAccumulator:
    """Streams (x, y) batches into float64 sufficient statistics for affine regression y ≈ A x + c.

    Moments are taken about a shift (the first batch's means) so that activations with a large common
    offset do not lose precision to cancellation when centring; every consumer undoes the shift exactly.
    """

    def __init__(self, d_in: int, d_out: int) -> None:
        self.d_in, self.d_out = d_in, d_out
        self.n = 0
        f64 = torch.float64
        self.shift_x = torch.zeros(d_in, dtype=f64)  # (d_in,)
        self.shift_y = torch.zeros(d_out, dtype=f64)  # (d_out,)
        self.sum_x = torch.zeros(d_in, dtype=f64)  # Σ x'  (x' = x − shift_x)
        self.sum_y = torch.zeros(d_out, dtype=f64)  # Σ y'
        self.sum_xx = torch.zeros(d_in, d_in, dtype=f64)  # Σ x' x'ᵀ
        self.sum_xy = torch.zeros(d_in, d_out, dtype=f64)  # Σ x' y'ᵀ
        self.sum_yy_diag = torch.zeros(d_out, dtype=f64)  # Σ y'² per dimension; Σ‖y'‖² is its sum

    @torch.no_grad()
    def update(self, x: Tensor, y: Tensor) -> None:
        if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"expected x (N, d_in) and y (N, d_out), got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.shape[1] != self.d_in or y.shape[1] != self.d_out:
            raise ValueError(f"expected widths ({self.d_in}, {self.d_out}), got ({x.shape[1]}, {y.shape[1]})")
        if x.shape[0] == 0:
            return
        x, y = x.detach().to(torch.float64), y.detach().to(torch.float64)  # (N, d_in), (N, d_out)
        if self.n == 0:
            self.shift_x, self.shift_y = x.mean(dim=0).cpu(), y.mean(dim=0).cpu()
        x, y = x - self.shift_x.to(x.device), y - self.shift_y.to(y.device)
        self.n += x.shape[0]
        self.sum_x += x.sum(dim=0).cpu()
        self.sum_y += y.sum(dim=0).cpu()
        self.sum_xx += (x.T @ x).cpu()
        self.sum_xy += (x.T @ y).cpu()
        self.sum_yy_diag += y.pow(2).sum(dim=0).cpu()

    def centred_moments(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(μ_x, μ_y, C_xx (d_in, d_in), C_xy (d_in, d_out)), population covariances (divide by n)."""
        if self.n == 0:
            raise ValueError("no samples accumulated")
        mu_x, mu_y = self.sum_x / self.n, self.sum_y / self.n  # shifted coordinates
        c_xx = self.sum_xx / self.n - torch.outer(mu_x, mu_x)
        c_xy = self.sum_xy / self.n - torch.outer(mu_x, mu_y)
        return mu_x + self.shift_x, mu_y + self.shift_y, c_xx, c_xy

    def total_sq_deviation(self) -> float:
        """Σ‖y − ȳ‖², pooled over dimensions: the R² denominator."""
        return float(self.sum_yy_diag.sum() - self.sum_y.pow(2).sum() / max(self.n, 1))

    def sse(self, a: Tensor, c: Tensor) -> float:
        """Σ‖y − A x − c‖² expanded into the moments, with A (d_out, d_in) and c (d_out,) in float64.

        In shifted coordinates the residual is y' − A x' − c' with c' = c + A shift_x − shift_y, and
        Σ‖y' − A x' − c'‖² = Σ‖y'‖² − 2 tr(A Σx'y'ᵀ) − 2 c'ᵀΣy' + tr(A Σx'x'ᵀ Aᵀ) + 2 c'ᵀA Σx' + n‖c'‖².
        """
        a, c = a.to(torch.float64).cpu(), c.to(torch.float64).cpu()
        c_s = c + a @ self.shift_x - self.shift_y  # (d_out,)
        sse = (
            self.sum_yy_diag.sum()
            - 2 * (a * self.sum_xy.T).sum()
            - 2 * c_s @ self.sum_y
            + ((a @ self.sum_xx) * a).sum()
            + 2 * c_s @ (a @ self.sum_x)
            + self.n * c_s.pow(2).sum()
        )
        return max(float(sse), 0.0)

    def r2(self, a: Tensor, c: Tensor) -> float:
        """Pooled R² = 1 − SSE / Σ‖y − ȳ‖² of the map (A, c) on this accumulator's samples."""
        sst = self.total_sq_deviation()
        return 1.0 - self.sse(a, c) / sst if sst > 0 else float("nan")


def _ridge(c_xx: Tensor, c_xy: Tensor, alpha_eff: float) -> Tensor:
    """A (d_out, d_in) = C_yx (C_xx + α_eff I)⁻¹, via Cholesky; pseudo-inverse when the system is singular."""
    if alpha_eff > 0:
        eye = torch.eye(c_xx.shape[0], dtype=c_xx.dtype)
        chol, info = torch.linalg.cholesky_ex(c_xx + alpha_eff * eye)
        if int(info) == 0:
            return torch.cholesky_solve(c_xy, chol).T
    # α = 0 (or a non-positive-definite system): minimum-norm least squares, robust to collinear inputs.
    return (torch.linalg.pinv(c_xx, rtol=_PINV_RTOL, hermitian=True) @ c_xy).T


def fit_affine(
    fit: MomentAccumulator, held_out: MomentAccumulator, alphas: Sequence[float] = DEFAULT_ALPHAS
) -> AffineMap:
    """Fit y ≈ A x + c by closed-form ridge on `fit`, choosing α by pooled R² on `held_out`.

    The ridge strength is scale-free: α_eff = α · tr(C_xx) / d_in (α times the mean eigenvalue of C_xx), so
    the same grid works whatever the activation norm. With population covariances this minimises
    Σ‖y − A x − c‖² + n · α_eff · ‖A‖_F² over the fit samples; c = μ_y − A μ_x is not penalised.
    The returned A, c are rounded to float32 first, and R² and s are then evaluated for the stored map.
    """
    if (fit.d_in, fit.d_out) != (held_out.d_in, held_out.d_out):
        raise ValueError("fit and held_out accumulators have different widths")
    if not alphas:
        raise ValueError("alphas must not be empty")
    mu_x, mu_y, c_xx, c_xy = fit.centred_moments()
    mean_eig = float(torch.trace(c_xx)) / fit.d_in
    best: tuple[float, float, Tensor, Tensor] | None = None  # (r2, alpha, A, c)
    r2_by_alpha: dict[float, float] = {}
    for alpha in alphas:
        a = _ridge(c_xx, c_xy, float(alpha) * mean_eig)  # (d_out, d_in)
        c = mu_y - a @ mu_x  # (d_out,)
        r2 = held_out.r2(a, c)
        r2_by_alpha[float(alpha)] = r2
        if best is None or r2 > best[0] or (math.isnan(best[0]) and not math.isnan(r2)):  # ties: smaller α
            best = (r2, float(alpha), a, c)
    assert best is not None
    _, alpha, a, c = best
    a32, c32 = a.to(torch.float32), c.to(torch.float32)
    sse = held_out.sse(a32, c32)
    rms = math.sqrt(sse / (held_out.n * held_out.d_out))
    return AffineMap(
        A=a32,
        c=c32,
        alpha=alpha,
        r2_held_out=held_out.r2(a32, c32),
        residual_scale=1.0 / rms if rms > 0 else 1.0,
        r2_by_alpha=r2_by_alpha,
    )
