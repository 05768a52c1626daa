"""Inference-time optimisation (ITO) of a stage's codes: gradient pursuit over the SAE's own decoder with a
per-token budget equal to the encoder's L0 (docs/methods.md §C.3, Engels et al. `encoder_pursuit.py`).

Why: it separates what the encoder gets wrong from what the dictionary cannot express. With the same
atoms and the same sparsity, whatever error ITO removes was the encoder's; the paper finds it removes
very little of the nonlinear error. Codes are signed for SA-GSAE (atoms chosen by |⟨ρ, d_j⟩|) and
non-negative otherwise (w ← max(w, 0) after each step). Per token the better of ITO's and the encoder's
codes is kept, so the error never grows and L0 never exceeds the encoder's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from core.sae.base import SparseAutoencoder, l0
from core.stack.runtime import RuntimeStage, StackRuntime, StageResult
from trainer.training.error_predictors import ErrorMoments, vector_split

CHUNK_ROWS = 2048  # rows per pursuit: the (rows, d_sae) residual correlations stay a few tens of MB


@torch.no_grad()
def gradient_pursuit(decoder: Tensor, b_dec: Tensor, x: Tensor, budget: Tensor, *, signed: bool) -> Tensor:
    """Codes w (N, H) with x ≈ w D + b_dec, at most budget[t] atoms for token t.

    decoder D (H, d) with unit rows, x (N, d), budget (N,) int. Per step, for tokens still within budget:
    ρ = s − w D, c = ρ Dᵀ, add argmax c (|c| when signed) to the support S, g = c ⊙ 1_S, u = g D,
    w ← w + (⟨u, ρ⟩ / ⟨u, u⟩) g, then w ← max(w, 0) unless signed.
    """
    n, h = x.shape[0], decoder.shape[0]
    s = x - b_dec  # (N, d)
    w = torch.zeros(n, h, dtype=x.dtype, device=x.device)  # (N, H)
    support = torch.zeros(n, h, dtype=torch.bool, device=x.device)  # (N, H)
    residual = s.clone()  # (N, d)
    steps = int(budget.max()) if n else 0
    for step in range(steps):
        active = budget > step  # (N,)
        c = residual @ decoder.T  # (N, H)
        pick = (c.abs() if signed else c).argmax(dim=-1)  # (N,)
        support[active, pick[active]] = True
        g = torch.where(support, c, torch.zeros_like(c))  # (N, H)
        u = g @ decoder  # (N, d)
        uu = u.pow(2).sum(-1)  # (N,)
        eta = torch.where(active & (uu > 0), (u * residual).sum(-1) / uu.clamp_min(1e-30), torch.zeros_like(uu))
        w += eta[:, None] * g
        if signed:
            residual -= eta[:, None] * u
        else:
            w.clamp_min_(0.0)
            residual = s - w @ decoder
    return w


@dataclass(frozen=True, eq=False)
class ItoResult:
    """Refined codes of N inputs in the SAE's input space."""

    codes: Tensor  # (N, H) ITO's codes where they reconstruct better, else the encoder's
    recon: Tensor  # (N, d) x̂ = decode(codes)
    budget: Tensor  # (N,) the encoder's L0
    improved: Tensor  # (N,) bool: ITO's codes were kept

    def error(self, x: Tensor) -> Tensor:
        return x - self.recon  # (N, d)


@torch.no_grad()
def refine(sae: SparseAutoencoder, x: Tensor, codes: Tensor | None = None) -> ItoResult:
    """ITO on x (N, d) with the encoder's L0 (of `codes`, or of sae.encode(x)) as the per-token budget."""
    codes = sae.encode(x) if codes is None else codes  # (N, H)
    budget = l0(codes)  # (N,)
    parts = []
    for start in range(0, x.shape[0], CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        parts.append(gradient_pursuit(sae.W_dec, sae.b_dec, x[rows], budget[rows], signed=sae.signed))
    pursued = torch.cat(parts) if parts else torch.zeros_like(codes)  # (N, H)
    encoder_sq = (x - sae.decode(codes)).pow(2).sum(-1)  # (N,)
    pursued_sq = (x - sae.decode(pursued)).pow(2).sum(-1)
    improved = pursued_sq < encoder_sq
    best = torch.where(improved[:, None], pursued, codes)
    return ItoResult(best, sae.decode(best), budget, improved)


@torch.no_grad()
def refine_stage(runtime: StackRuntime, stage: RuntimeStage, h: Tensor, prev: Tensor | None = None,
                 codes: Tensor | None = None) -> StageResult:
    """The stage's decomposition of h (N, d) with ITO codes (from the encoder's `codes` when given): recon
    and error in activation space, as `StackRuntime.run_stage` reports them (no predicted norm)."""
    x = runtime.sae_input(stage, h, prev)  # (N, d)
    result = refine(stage.sae, x, codes)
    recon = runtime.to_activation(stage, result.recon, prev)
    return StageResult(result.codes, x, result.recon, recon, h.reshape(recon.shape).to(recon.dtype) - recon)


class ItoAccumulator:
    """Streams one stage's encoder and ITO errors for the total/nonlinear comparison (test rows, refitted
    vector probes: methods §C.3 step 4)."""

    def __init__(self, d: int) -> None:
        self.encoder, self.ito = ErrorMoments(d), ErrorMoments(d)
        self.l0_encoder = self.l0_ito = 0.0
        self.improved = 0

    def update(self, encoded: StageResult, refined: StageResult, h: Tensor) -> None:
        self.encoder.update(encoded.sae_input, encoded.error, h)
        self.ito.update(refined.sae_input, refined.error, h)
        self.l0_encoder += float(l0(encoded.codes).sum())
        self.l0_ito += float(l0(refined.codes).sum())
        self.improved += int((refined.codes != encoded.codes).any(-1).sum())

    def result(self) -> dict[str, Any]:
        _, enc = vector_split(self.encoder)
        _, ito = vector_split(self.ito)
        rows = max(self.encoder.rows, 1)
        return {
            "ito_l0": self.l0_ito / rows, "ito_encoder_l0": self.l0_encoder / rows,
            "ito_improved_fraction": self.improved / rows,
            "ito_fvu_total": ito["fvu_total"], "ito_fvu_nonlinear": ito["fvu_nonlinear"],
            "ito_encoder_fvu_total": enc["fvu_total"], "ito_encoder_fvu_nonlinear": enc["fvu_nonlinear"],
            "ito_total_error_reduction": 1.0 - ito["fvu_total"] / enc["fvu_total"],
            "ito_nonlinear_error_reduction": 1.0 - ito["fvu_nonlinear"] / enc["fvu_nonlinear"],
        }


def ito_metrics(runtime: StackRuntime, batches: Any, *, max_tokens: int | None = None) -> list[dict[str, Any]]:
    """Per stage: how much ITO reduces the total and the nonlinear error on held-out batches
    {hookpoint: (B, d)} (raw activations), teacher-forced."""
    accs = [ItoAccumulator(s.sae.d_in) for s in runtime.stages]
    for batch in batches:
        update_ito(runtime, batch, runtime.decompose(batch), accs)
        if max_tokens is not None and accs[0].encoder.rows >= max_tokens:
            break
    return [acc.result() for acc in accs]


def update_ito(runtime: StackRuntime, batch: Mapping[str, Tensor], results: Mapping[int, StageResult],
               accs: list[ItoAccumulator]) -> None:
    """Refine every decomposed stage of one batch and stream both errors into `accs`."""
    for i, encoded in results.items():
        stage = runtime.stages[i]
        prev = None if stage.residual_of is None else batch[runtime.stages[stage.residual_of].hookpoint]
        h = batch[stage.hookpoint]
        refined = refine_stage(runtime, stage, h, prev, encoded.codes)
        accs[i].update(encoded, refined, h.reshape(-1, stage.sae.d_in))
