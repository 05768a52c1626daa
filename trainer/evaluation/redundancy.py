"""Decoder redundancy between and within dictionaries (docs/methods.md §A.4, §E.1).

ReSAE claims that training a later stage on the residual left by an affine predictor makes its dictionary
*less redundant* with the previous stage's: a plain per-layer SAE re-learns the directions that the residual
stream carries forward, a ReSAE should not need to. We measure this as, for each atom of the later stage, the
largest |cos| to any atom of the earlier stage, both raw (same space only) and after mapping the earlier atoms
through the fitted affine map A (so carried-forward copies line up). The within-dictionary counterpart is
SAEBench's max decoder cosine similarity.

Atoms are the rows of the decoders; they may have any norm (a ReSAE stage's effective original-space atom is
S⁻¹ d, a rescaling), so everything is normalised here. Atoms with (numerically) zero norm, for instance an earlier
atom that A maps to ~0, get cosine 0 with everything rather than NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

# An atom counts as zero when its norm is below this fraction of the largest norm in its dictionary: the
# float64 products below leave round-off of ~1e-16 relative, so a direction in A's null space lands far below it.
_ZERO_REL = 1e-8


def unit_rows(w: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Rows scaled to unit norm; (numerically) zero rows stay zero so that their cosines are 0, not NaN."""
    w = w.to(torch.float64)  # (H, d): normalise in float64 whatever the storage dtype
    norms = w.norm(dim=1, keepdim=True)  # (H, 1)
    floor = _ZERO_REL * float(norms.max()) if norms.numel() else 0.0
    nonzero = norms > max(floor, torch.finfo(torch.float64).tiny)  # (H, 1)
    unit = torch.where(nonzero, w / norms.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(w))
    return unit.to(dtype)


@torch.no_grad()
def max_abs_cos(current: Tensor, reference: Tensor, *, chunk: int = 4096, exclude_self: bool = False) -> Tensor:
    """For each row of `current`, max over rows of `reference` of |cos|; both already unit (or zero) rows.

    Works in chunks of `chunk` rows of `current`, so the similarity block is (chunk, H_ref), never (H, H_ref).
    With `exclude_self` (same dictionary) the diagonal is skipped.
    """
    if chunk < 1:
        raise ValueError("chunk must be positive")
    out = torch.zeros(current.shape[0], dtype=torch.float64, device=current.device)  # (H_cur,)
    if reference.shape[0] == 0 or current.shape[0] == 0:
        return out
    for start in range(0, current.shape[0], chunk):
        block = current[start : start + chunk]  # (c, d)
        sims = (block @ reference.T).abs()  # (c, H_ref)
        if exclude_self:
            rows = torch.arange(block.shape[0], device=sims.device)
            sims[rows, rows + start] = 0.0
        out[start : start + block.shape[0]] = sims.amax(dim=1).clamp(max=1.0).to(torch.float64)
    return out


def _summary(best: Tensor, threshold: float) -> tuple[float, float]:
    """Mean of the per-atom maxima and the fraction of atoms whose maximum exceeds `threshold`."""
    if best.numel() == 0:
        return 0.0, 0.0
    return float(best.mean()), float((best > threshold).double().mean())


@torch.no_grad()
def decoder_redundancy(
    previous: Tensor,
    current: Tensor,
    affine_A: Tensor | None = None,
    *,
    threshold: float = 0.9,
    chunk: int = 4096,
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Cross-stage redundancy of `current`'s atoms (H2, d_cur) against `previous`'s atoms (H1, d_prev).

    For each current atom: max_k |cos(d_cur_j, d_prev_k)|; report the mean of those maxima and the fraction
    above `threshold`. Raw comparison only when d_prev == d_cur; the mapped comparison uses A @ d_prev_k with
    A of shape (d_cur, d_prev), the ReSAE predictor, and is reported when A is given. `dtype` is the dtype of
    the similarity matmuls (float32 is ample for cosines and twice as fast as float64 on CPU).
    """
    if previous.ndim != 2 or current.ndim != 2:
        raise ValueError("decoders must be 2-D (atoms, d)")
    d_prev, d_cur = previous.shape[1], current.shape[1]
    cur = unit_rows(current, dtype)  # (H2, d_cur)
    result: dict[str, float] = {}
    if d_prev == d_cur:
        prev = unit_rows(previous, dtype).to(cur.device)  # (H1, d)
        mean, frac = _summary(max_abs_cos(cur, prev, chunk=chunk), threshold)
        result["redundancy_raw_mean_max_cos"] = mean
        result["redundancy_raw_frac_above"] = frac
    if affine_A is not None:
        if tuple(affine_A.shape) != (d_cur, d_prev):
            raise ValueError(f"affine_A must be (d_cur, d_prev) = ({d_cur}, {d_prev}), got {tuple(affine_A.shape)}")
        mapped = previous.to(torch.float64) @ affine_A.to(previous.device, torch.float64).T  # (H1, d_cur) rows A d_k
        prev_mapped = unit_rows(mapped, dtype).to(cur.device)  # (H1, d_cur)
        mean, frac = _summary(max_abs_cos(cur, prev_mapped, chunk=chunk), threshold)
        result["redundancy_mapped_mean_max_cos"] = mean
        result["redundancy_mapped_frac_above"] = frac
    return result


@torch.no_grad()
def within_stage_max_cos(W_dec: Tensor, *, chunk: int = 4096, dtype: torch.dtype = torch.float32) -> float:
    """SAEBench's max decoder cosine similarity: mean over atoms of the max |cos| to another atom (H, d).

    High values mean near-duplicate atoms (wasted capacity, feature splitting); a single atom gives 0.
    """
    if W_dec.ndim != 2:
        raise ValueError("W_dec must be 2-D (atoms, d)")
    unit = unit_rows(W_dec, dtype)  # (H, d)
    best = max_abs_cos(unit, unit, chunk=chunk, exclude_self=True)  # (H,)
    return float(best.mean()) if best.numel() else 0.0
