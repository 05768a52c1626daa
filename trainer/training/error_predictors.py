"""Error-norm prediction (SAE dark matter, docs/methods.md §C): per-stage linear probes of the SAE's
error, fitted in closed form on held-out tokens, with their held-out R² and the linear/nonlinear split.

Why: Engels et al. find most of an SAE's error *norm* and about half of its error *vector* linearly
predictable from the activation, so a stage can report how badly it reconstructs a token at the cost of
one dot product, and the error splits into a linear part a*ᵀx and a nonlinear remainder.

Inputs and units (core/stack/error_predictor.py): x is the stage's SAE input (`StackRuntime.sae_input`), targets
are in activation units: the error h − ĥ and its norm, what the runtime reports. For every stage e = (x − x̂)/s,
so R² values do not depend on the choice of space. One pass streams the rows into float64 moments
(trainer/training/affine_fit.py) split by row: every fifth row tests (reported R²), the next chooses the ridge strength,
the other three fit. Rows are tokens in the order the batches give them (shuffled from the store), as the
paper splits a random permutation of tokens.

FVU split (test rows, relative to the activation variance Σ‖h − h̄‖², as the stage's FVE):
fvu_total = Σ‖e‖², fvu_linear = Σ‖a*ᵀx + c‖², fvu_nonlinear = Σ‖e − a*ᵀx − c‖² (the vector probe's residual);
nonlinear_share = fvu_nonlinear / fvu_total. The intercept belongs to the linear part.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from core.stack.affine import AffineMap
from core.stack.error_predictor import ErrorPredictor
from core.stack.runtime import StackRuntime
from trainer.training.affine_fit import MomentAccumulator, fit_affine

SPLITS = ("fit", "select", "test")
SPLIT_EVERY = 5  # row % 5 == 0 tests, == 1 selects α, the rest fit


def split_masks(start: int, rows: int, device: torch.device) -> dict[str, Tensor]:
    """Boolean (rows,) masks of the three splits for rows start .. start + rows − 1 of a stream."""
    phase = torch.arange(start, start + rows, device=device) % SPLIT_EVERY
    return {"test": phase == 0, "select": phase == 1, "fit": phase >= 2}


class ErrorMoments:
    """One stage's rows as float64 moments per split: inputs [x, t·ĥ_prev], targets [e, ‖e‖], and the
    activation's sum and squared norm for FVU denominators."""

    def __init__(self, d: int, d_prev: int | None = None) -> None:
        self.d, self.d_prev = d, d_prev
        width = d + (d_prev or 0)
        self.acc = {s: MomentAccumulator(width, d + 1) for s in SPLITS}
        self.h_sum = {s: torch.zeros(d, dtype=torch.float64) for s in SPLITS}  # Σ h
        self.h_sq = dict.fromkeys(SPLITS, 0.0)  # Σ‖h‖²
        self.rows = 0
        self.prev_input_scale: float | None = None  # t: brings ĥ_prev to E‖t·ĥ_prev‖² = d_prev (first batch)

    @torch.no_grad()
    def update(self, x: Tensor, error: Tensor, h: Tensor, prev_recon: Tensor | None = None) -> None:
        """x (N, d) SAE input, error (N, d) h − ĥ in activation units, h (N, d), prev_recon (N, d_prev)."""
        if (prev_recon is None) != (self.d_prev is None):
            raise ValueError("pass prev_recon exactly when the moments were made with d_prev")
        x, error, h = x.double(), error.double(), h.double()
        inputs = x
        if prev_recon is not None:
            prev_recon = prev_recon.double()
            if self.prev_input_scale is None:
                mean_sq = float(prev_recon.pow(2).sum(-1).mean())
                self.prev_input_scale = math.sqrt(prev_recon.shape[1] / mean_sq) if mean_sq > 0 else 1.0
            inputs = torch.cat([x, prev_recon * self.prev_input_scale], dim=-1)  # (N, d + d_prev)
        targets = torch.cat([error, error.norm(dim=-1, keepdim=True)], dim=-1)  # (N, d + 1)
        for split, mask in split_masks(self.rows, x.shape[0], x.device).items():
            self.acc[split].update(inputs[mask], targets[mask])
            self.h_sum[split] += h[mask].sum(dim=0).cpu()
            self.h_sq[split] += float(h[mask].pow(2).sum())
        self.rows += x.shape[0]

    def activation_variance(self, split: str = "test") -> float:
        """Σ‖h − h̄‖² over a split: the FVU denominator."""
        n = self.acc[split].n
        return self.h_sq[split] - float(self.h_sum[split].pow(2).sum()) / n if n else math.nan

    def restrict(self, split: str, inputs: slice, outputs: slice) -> MomentAccumulator:
        """The split's moments for a subset of input and output columns (a probe on fewer variables)."""
        acc = self.acc[split]
        cols_in, cols_out = range(acc.d_in)[inputs], range(acc.d_out)[outputs]
        sub = MomentAccumulator(len(cols_in), len(cols_out))
        sub.n = acc.n
        sub.shift_x, sub.shift_y = acc.shift_x[inputs], acc.shift_y[outputs]
        sub.sum_x, sub.sum_y = acc.sum_x[inputs], acc.sum_y[outputs]
        sub.sum_xx, sub.sum_xy = acc.sum_xx[inputs, inputs], acc.sum_xy[inputs, outputs]
        sub.sum_yy_diag = acc.sum_yy_diag[outputs]
        return sub


# ------------------------------------------------------------------------------------ moment algebra


def per_output_sse(acc: MomentAccumulator, a: Tensor, c: Tensor) -> Tensor:
    """Σ_t (y_j − a_j·x − c_j)² per output j, (d_out,), expanded into the moments (see MomentAccumulator.sse)."""
    a, c = a.double().cpu(), c.double().cpu()
    c_s = c + a @ acc.shift_x - acc.shift_y  # (d_out,)
    sse = (acc.sum_yy_diag - 2 * (a * acc.sum_xy.T).sum(1) - 2 * c_s * acc.sum_y
           + ((a @ acc.sum_xx) * a).sum(1) + 2 * c_s * (a @ acc.sum_x) + acc.n * c_s.pow(2))
    return sse.clamp_min(0.0)


def per_output_sst(acc: MomentAccumulator) -> Tensor:
    """Σ_t (y_j − ȳ_j)² per output j, (d_out,)."""
    return (acc.sum_yy_diag - acc.sum_y.pow(2) / max(acc.n, 1)).clamp_min(0.0)


def prediction_energy(acc: MomentAccumulator, a: Tensor, c: Tensor) -> float:
    """Σ_t ‖A x_t + c‖²."""
    a, c = a.double().cpu(), c.double().cpu()
    c2 = c + a @ acc.shift_x  # A x + c = A x' + c2 with x' the shifted input
    return max(float(((a @ acc.sum_xx) * a).sum() + 2 * c2 @ (a @ acc.sum_x) + acc.n * c2.pow(2).sum()), 0.0)


def target_energy(acc: MomentAccumulator) -> float:
    """Σ_t ‖y_t‖² (uncentred)."""
    return float(acc.sum_yy_diag.sum() + 2 * acc.shift_y @ acc.sum_y + acc.n * acc.shift_y.pow(2).sum())


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


# ------------------------------------------------------------------------------------------ fitting


def _fit(m: ErrorMoments, inputs: slice, outputs: slice) -> tuple[AffineMap, MomentAccumulator]:
    """Ridge probe on the fit rows, α chosen on the select rows; returns it with the test moments."""
    fit, select, test = (m.restrict(s, inputs, outputs) for s in SPLITS)
    if min(fit.n, select.n, test.n) == 0:
        raise ValueError(f"too few held-out tokens to fit error probes: {fit.n} fit, {select.n} select, "
                         f"{test.n} test rows")
    return fit_affine(fit, select), test


def vector_split(m: ErrorMoments) -> tuple[AffineMap, dict[str, float]]:
    """The vector probe x → e and the linear/nonlinear split of the error on the test rows."""
    d = m.d
    vec, test = _fit(m, slice(0, d), slice(0, d))
    sse = per_output_sse(test, vec.A, vec.c)  # (d,) nonlinear energy per dimension
    sst = per_output_sst(test)
    variance = m.activation_variance("test")
    total, nonlinear = target_energy(test), float(sse.sum())
    kept = sst > 0
    return vec, {
        "vector_r2": 1.0 - _ratio(nonlinear, float(sst.sum())),
        "vector_r2_per_dim": float((1.0 - sse[kept] / sst[kept]).mean()) if bool(kept.any()) else math.nan,
        "fvu_total": _ratio(total, variance),
        "fvu_linear": _ratio(prediction_energy(test, vec.A, vec.c), variance),
        "fvu_nonlinear": _ratio(nonlinear, variance),
        "nonlinear_share": _ratio(nonlinear, total),
        "alpha_vector": vec.alpha,
    }


def fit_predictor(m: ErrorMoments, from_stage: int | None = None) -> ErrorPredictor:
    """All probes of one stage from its moments; metrics are on the test rows."""
    d = m.d
    norm, norm_test = _fit(m, slice(0, d), slice(d, d + 1))
    vec, metrics = vector_split(m)
    metrics = {"norm_r2": norm_test.r2(norm.A, norm.c), **metrics, "alpha_norm": norm.alpha}
    prev_weight = prev_bias = None
    metrics |= {"prev_r2": None, "prev_gain": None}  # stage 0 has no previous stage
    if m.d_prev is not None:
        prev, prev_test = _fit(m, slice(None), slice(d, d + 1))
        prev_weight, prev_bias = prev.A[0], prev.c
        metrics |= {"prev_r2": prev_test.r2(prev.A, prev.c), "alpha_prev": prev.alpha}
        metrics["prev_gain"] = metrics["prev_r2"] - metrics["norm_r2"]
    metrics |= {f"tokens_{s}": m.acc[s].n for s in SPLITS}
    return ErrorPredictor(norm.A[0], norm.c, vec.A, vec.c, prev_weight, prev_bias,
                          from_stage if m.d_prev is not None else None, m.prev_input_scale or 1.0, metrics)


def stage_moments(runtime: StackRuntime) -> list[ErrorMoments]:
    """Empty moments per stage; stage i > 0 also reads stage i − 1's reconstruction."""
    return [ErrorMoments(s.sae.d_in, runtime.stages[s.index - 1].sae.d_in if s.index > 0 else None)
            for s in runtime.stages]


@torch.no_grad()
def accumulate(runtime: StackRuntime, batch: Mapping[str, Tensor], moments: list[ErrorMoments]) -> dict:
    """Decompose one batch of raw activations {hookpoint: (B, d)} teacher-forced and stream every stage's
    rows into `moments`; returns the runtime's StageResults by stage index."""
    results = runtime.decompose(batch)
    for i, result in results.items():
        stage = runtime.stages[i]
        h = batch[stage.hookpoint].reshape(-1, stage.sae.d_in)
        moments[i].update(result.sae_input, result.error, h, results[i - 1].recon if i > 0 else None)
    return results


def fit_error_predictors(runtime: StackRuntime, batches: Iterable[Mapping[str, Tensor]], *,
                         max_tokens: int | None = None) -> list[ErrorPredictor]:
    """Fit every stage's probes on held-out batches of raw activations {hookpoint: (B, d)}."""
    moments = stage_moments(runtime)
    seen = 0
    for batch in batches:
        accumulate(runtime, batch, moments)
        seen = moments[0].rows
        if max_tokens is not None and seen >= max_tokens:
            break
    return [fit_predictor(m, i - 1 if i > 0 else None) for i, m in enumerate(moments)]


def summary(predictor: ErrorPredictor) -> dict[str, Any]:
    """The headline numbers of a stored predictor, for tables."""
    keys = ("norm_r2", "vector_r2", "nonlinear_share", "prev_r2", "prev_gain", "tokens_test")
    return {k: predictor.metrics.get(k) for k in keys}
