"""Meta-SAE regularised training (MetaSAEs, docs/methods.md §D).

A small BatchTopK meta-SAE learns to reconstruct the primary SAE's unit decoder rows d_i, and the
primary loss pays d·λ₂·mean_i p_i with p_i = exp(−‖d_i − Ŵ_i‖²/σ²), Ŵ_i = meta(d_i). A row that is an
easy sum of a few meta-latents (p_i ≈ 1) is a composite of other concepts; the penalty pushes it to be
more atomic.

Scale of λ₂ (`[meta_sae] lambda_per_dim`): the paper minimises (1/d)·E‖x − x̂‖² + λ₂·mean_i p_i, a squared
error averaged over the d dimensions of inputs normalised per token to zero mean and unit variance (‖x‖² ≈ d;
its code's `.pow(2).mean()`). Ours (`SparseAutoencoder.mse`) minimises E‖x − x̂‖², summed over d, on inputs
scaled so that E‖x‖² = d: d × the paper's reconstruction term at the same fit. The paper's trade-off in our units:
    L = E‖x − x̂‖² + d·λ₂·mean_i p_i = d·[(1/d)·E‖x − x̂‖² + λ₂·mean_i p_i],
the paper's objective times d: every gradient ratio (penalty vs reconstruction, on W_dec as elsewhere) is the
paper's, at any d. λ₂ = 0.3 is the paper's best whatever the hookpoint width.

Gradient flow (§D.2, as in the paper's code): Ŵ is computed under no_grad from W_dec.detach(), so
∂p_i/∂d_i = −(2/σ²) p_i (d_i − Ŵ_i): a step on the penalty moves each row away from its meta
reconstruction, and nothing reaches the meta-SAE (a frozen critic). `train_step` then removes the
radial part of W_dec's gradient and renormalises the rows, so the penalty rotates directions.
(Differentiating through meta(d_i) in d_i as well, with frozen meta parameters, would be another
objective, whose gradient partly cancels as the reconstruction follows the row; the paper does not.)

Schedule: alternating phases keyed on the primary step counter. After every `primary_steps` primary
steps (one activation batch each) come `meta_steps` meta steps, each on all current decoder rows as one
batch (BatchTopK keeps H·k values: a mean of k meta-latents per row). Keyed on the step, a resumed run
replays the same schedule. As in the paper a phase of primary steps comes first, against a freshly
initialised critic; the meta-SAE's Adam uses the primary's base learning rate, without a schedule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from core.sae.base import SAEConfig, SparseAutoencoder, l0
from core.sae.batchtopk import BatchTopKSAE, keep_batch_top_k
from core.sae.registry import build_sae
from trainer.training.checkpoint import StageTrainingState
from trainer.training.config import MetaSAESection
from trainer.training.optimization import DeadLatentTracker, fve, make_optimizer, train_step

DEAD_AFTER_META_STEPS = 5
"""A meta-latent is dead after this many meta steps without firing on any row (the paper's 5 batches)."""


def meta_config(section: MetaSAESection, d_in: int) -> SAEConfig:
    """The meta-SAE's SAEConfig: BatchTopK over d_in-dimensional decoder rows."""
    return SAEConfig(architecture="batchtopk", d_in=d_in, d_sae=section.width, k=section.k,
                     aux_k=min(SAEConfig.aux_k, section.width))


def build_meta_state(section: MetaSAESection, W_dec: Tensor, lr: float) -> StageTrainingState:
    """A fresh meta-SAE for the decoder W_dec (H, d), with its Adam and dead-latent tracker, on W_dec's device."""
    n_rows, d_in = W_dec.shape
    meta = build_sae(meta_config(section, d_in)).to(W_dec.device)
    tracker = DeadLatentTracker(section.width, DEAD_AFTER_META_STEPS * n_rows, W_dec.device)
    return StageTrainingState(meta, make_optimizer(meta, lr), tracker)


def unit_rows(W_dec: Tensor) -> Tensor:
    """Decoder rows scaled to unit norm, detached: the meta-SAE's input (H, d)."""
    rows = W_dec.detach()
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-8)


def reconstruct_rows(meta: SparseAutoencoder, rows: Tensor) -> Tensor:
    """Ŵ (H, d): the meta-SAE's reconstruction of all rows with BatchTopK selection over the whole set
    (mean k meta-latents per row), as in training but without touching the meta-SAE's threshold."""
    acts = torch.relu(meta.pre_activation(rows))  # (H, m)
    return meta.decode(keep_batch_top_k(acts, meta.cfg.k))  # (H, d)


def decomposability(W_dec: Tensor, meta: SparseAutoencoder, sigma2: float) -> Tensor:
    """mean_i exp(−‖d_i − sg(meta(d_i))‖²/σ²), differentiable in W_dec only: a scalar."""
    with torch.no_grad():
        target = reconstruct_rows(meta, unit_rows(W_dec))  # (H, d), a constant
    distance = (W_dec - target).pow(2).sum(dim=1)  # (H,)
    return torch.exp(-distance / sigma2).mean()


def penalty_weight(section: MetaSAESection, d_in: int) -> float:
    """The penalty's weight in our loss, d_in·λ₂: our reconstruction loss sums over the d_in dimensions where the
    paper's averages, so λ₂ (per dimension, the paper's scale) is multiplied by d_in (module docstring)."""
    return section.lambda_per_dim * d_in


def penalty_term(meta_state: StageTrainingState, section: MetaSAESection) -> Callable[[SparseAutoencoder], Tensor]:
    """The extra primary-loss term for `train_step`: d_in·λ₂·decomposability(W_dec)."""

    def penalty(sae: SparseAutoencoder) -> Tensor:
        weight = penalty_weight(section, sae.W_dec.shape[1])
        return weight * decomposability(sae.W_dec, meta_state.sae, section.sigma2)

    return penalty


def meta_phase_due(step: int, section: MetaSAESection) -> bool:
    """Whether a meta phase follows primary step `step` (0-based)."""
    return (step + 1) % section.primary_steps == 0


def meta_step(W_dec: Tensor, meta_state: StageTrainingState) -> dict[str, float]:
    """One meta-SAE step on the primary's current unit decoder rows; the primary is not touched."""
    rows = unit_rows(W_dec)  # (H, d)
    dead = meta_state.tracker.dead_mask()
    out = train_step(meta_state.sae, meta_state.optimizer, rows, dead_mask=dead)
    meta_state.tracker.update(out.z)
    return {"meta_loss": float(out.losses["total"]), "meta_fve": fve(rows, out.x_hat)}


def meta_phase(W_dec: Tensor, meta_state: StageTrainingState, steps: int) -> dict[str, float]:
    """`steps` meta steps on the decoder W_dec (H, d); returns the last step's loss and FVE."""
    meta_state.sae.train()
    result: dict[str, float] = {}
    for _ in range(steps):
        result = meta_step(W_dec, meta_state)
    return result


@torch.no_grad()
def meta_metrics(W_dec: Tensor, meta: SparseAutoencoder, section: MetaSAESection | None = None) -> dict[str, float]:
    """Calibrate the meta-SAE's serving threshold on the final rows (mean L0 = k), then measure it there:
    FVE of the rows, L0, dead meta-latents, mean p_i and, with `section`, the penalty d·λ₂·mean p_i as it enters
    our loss (comparable with the summed-over-d `mse`; the paper's scale is meta_penalty / d)."""
    rows = unit_rows(W_dec)  # (H, d)
    if isinstance(meta, BatchTopKSAE):
        meta.calibrate_threshold_(rows)
    z = meta.encode(rows)  # (H, m)
    recon = meta.decode(z)  # (H, d)
    mean_p = float(torch.exp(-(rows - recon).pow(2).sum(dim=1) / (section.sigma2 if section else 1.0)).mean())
    metrics = {"meta_fve": fve(rows, recon), "meta_l0": float(l0(z).float().mean()),
               "meta_dead_fraction": float((z == 0).all(dim=0).float().mean()),
               "meta_width": meta.d_sae, "meta_k": meta.cfg.k, "meta_mean_p": mean_p}
    if section is not None:
        metrics["meta_penalty"] = penalty_weight(section, W_dec.shape[1]) * mean_p
    return metrics


def fit_meta_sae(W_dec: Tensor, section: MetaSAESection, *, steps: int = 2000, lr: float = 1e-3,
                 seed: int = 0) -> tuple[SparseAutoencoder, dict[str, float]]:
    """Train a meta-SAE post hoc on a frozen decoder (H, d), e.g. a solo SAE's, the way Bussmann et al.
    did; returns it (threshold calibrated) with `meta_metrics`. Compares decomposability across runs."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = build_meta_state(section, W_dec, lr)
    meta_phase(W_dec, state, steps)
    state.sae.eval()
    return state.sae, meta_metrics(W_dec, state.sae, section)
