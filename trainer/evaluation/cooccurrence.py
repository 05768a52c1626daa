"""Latent co-occurrence: mean |φ| over all pairs of latents (docs/methods.md §D.4), the MetaSAEs
paper's measure of how often latents fire together (lower: more atomic latents).

    φ(i, j) = (N11·n − N1i·N1j) / sqrt(N1i(n − N1i) · N1j(n − N1j))

over n tokens, N1i the tokens on which latent i fires and N11 those on which both fire.

Binarisation (our rule; the paper fits per-feature equal-error-rate thresholds against BatchTopK's
training-time selection, which our served encoders make unnecessary: every architecture here encodes a
token independently of its batch). Latent i fires when |z_i| > θ_i, with θ_i calibrated on held-out
tokens that are not used for measuring: θ_i = `relative` × the mean |z_i| over the calibration tokens
where z_i ≠ 0 (default 0.1, a noise floor that drops near-zero ReLU-style activations and leaves
thresholded encoders such as TopK/BatchTopK/JumpReLU practically unchanged); a latent that never fires
on the calibration tokens gets θ_i = 0 (any non-zero code counts).

Pairs: i < j (no diagonal), over the latents that fire on some but not all measured tokens; φ is
undefined (zero variance) for the others, which are counted and left out.

Memory: the binarised codes, n × H bytes, and one block × block tile of counts; the H × H matrix of φ
or N11 never exists. Noise: for independent latents E|φ| ≈ sqrt(2/(π n)) (`phi_noise_floor`), which
dominates mean |φ| unless n is large; compare runs measured on the same tokens.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.host.host_model import HostModel
from core.stack.runtime import StackRuntime
from trainer.data.activations import batch_windows, iter_windows, special_token_ids
from trainer.data.corpus import Document
from trainer.evaluation.held_out import open_held_out

logger = logging.getLogger(__name__)

DEFAULT_RELATIVE = 0.1
MAX_EXACT_CHUNK = 1 << 24  # float32 sums of 0/1 products are exact up to 2^24 terms


class ThresholdCalibrator:
    """Streams codes (N, H) and turns them into per-latent firing thresholds (the module's rule)."""

    def __init__(self, d_sae: int) -> None:
        self.abs_sum = torch.zeros(d_sae, dtype=torch.float64)
        self.fired = torch.zeros(d_sae, dtype=torch.float64)
        self.tokens = 0

    @torch.no_grad()
    def update(self, z: Tensor) -> None:
        magnitude = z.detach().abs().double().cpu()  # (N, H)
        self.abs_sum += magnitude.sum(dim=0)
        self.fired += (magnitude > 0).sum(dim=0).double()
        self.tokens += z.shape[0]

    def thresholds(self, relative: float = DEFAULT_RELATIVE) -> Tensor:
        """θ (H,) float32: relative × mean non-zero |z_i|, 0 for latents never seen firing."""
        return (relative * self.abs_sum / self.fired.clamp_min(1)).float()


def _chunks(codes: Tensor | Iterable[Tensor]) -> Iterable[Tensor]:
    return [codes] if isinstance(codes, Tensor) else codes


def calibrate_thresholds(codes: Tensor | Iterable[Tensor], relative: float = DEFAULT_RELATIVE) -> Tensor:
    """Per-latent thresholds θ (H,) from calibration codes (N, H) or an iterable of such chunks."""
    calibrator: ThresholdCalibrator | None = None
    for z in _chunks(codes):
        calibrator = calibrator or ThresholdCalibrator(z.shape[-1])
        calibrator.update(z)
    if calibrator is None:
        raise ValueError("no calibration codes were given")
    return calibrator.thresholds(relative)


def binarize(z: Tensor, thresholds: Tensor) -> Tensor:
    """Firing (N, H) bool: z ≠ 0 and |z| > θ (signed codes fire at either pole)."""
    magnitude = z.detach().abs()
    return (magnitude > 0) & (magnitude > thresholds.to(magnitude.device, magnitude.dtype))


@torch.no_grad()
def phi_from_active(active: Tensor, *, block: int = 1024, token_chunk: int = 16384) -> dict[str, Any]:
    """Mean |φ| over latent pairs of binary firing (n, H), tile by tile (block × block counts at a time)."""
    if block < 1 or not 1 <= token_chunk <= MAX_EXACT_CHUNK:
        raise ValueError(f"block must be >= 1 and token_chunk in [1, 2^24], got {block} and {token_chunk}")
    n = active.shape[0]
    counts = active.sum(dim=0).double()  # (H,)
    never, always = counts == 0, counts == n
    keep = (~never & ~always).nonzero().squeeze(1)
    fires, c = active[:, keep], counts[keep]  # (n, H_v), (H_v,)
    spread = (c * (n - c)).sqrt()  # (H_v,) n·std of each latent's firing
    total, pairs = 0.0, 0
    for a in range(0, len(keep), block):
        rows = slice(a, min(a + block, len(keep)))
        for b in range(a, len(keep), block):
            cols = slice(b, min(b + block, len(keep)))
            both = torch.zeros(rows.stop - a, cols.stop - b, dtype=torch.float64)  # N11 tile
            for t in range(0, n, token_chunk):
                chunk = fires[t : t + token_chunk]
                both += (chunk[:, rows].T.float() @ chunk[:, cols].float()).double()
            phi = (both * n - c[rows, None] * c[None, cols]) / (spread[rows, None] * spread[None, cols])
            if a == b:  # a diagonal tile: pairs i < j only
                phi = phi.triu(diagonal=1)
                pairs += phi.shape[0] * (phi.shape[0] - 1) // 2
            else:
                pairs += phi.numel()
            total += float(phi.abs().sum())
    return {"mean_abs_phi": total / pairs if pairs else None, "phi_pairs": pairs, "phi_latents": len(keep),
            "phi_never_fire": int(never.sum()), "phi_always_fire": int(always.sum()), "phi_tokens": n,
            "phi_noise_floor": math.sqrt(2 / (math.pi * n)) if n else None}


def phi_stats(codes: Tensor | Iterable[Tensor], thresholds: Tensor, *, block: int = 1024) -> dict[str, Any]:
    """`phi_from_active` of codes (n, H) (or chunks of them) binarised with `thresholds` (H,)."""
    active = torch.cat([binarize(z, thresholds).cpu() for z in _chunks(codes)])  # (n, H) bool
    return phi_from_active(active, block=block)


def mean_abs_phi(codes: Tensor | Iterable[Tensor], thresholds: Tensor, *, block: int = 1024) -> float:
    """Mean |φ| over all latent pairs i < j (NaN when fewer than two latents vary)."""
    value = phi_stats(codes, thresholds, block=block)["mean_abs_phi"]
    return math.nan if value is None else value


# ------------------------------------------------------------------------------------------- on a stack


def stage_codes(runtime: StackRuntime, activations: Mapping[str, Tensor]) -> list[Tensor]:
    """Every stage's served codes (N, d_sae) from raw activations {hookpoint: (N, d)}."""
    codes = []
    for stage in runtime.stages:
        prev = None if stage.residual_of is None else activations[runtime.stages[stage.residual_of].hookpoint]
        codes.append(runtime.encode(stage, activations[stage.hookpoint], prev))
    return codes


@torch.no_grad()
def stage_cooccurrence(runtime: StackRuntime, batches: Iterable[Mapping[str, Tensor]], *, calibration_tokens: int,
                       max_tokens: int, relative: float = DEFAULT_RELATIVE, block: int = 1024) -> list[dict[str, Any]]:
    """Per stage, `phi_from_active` on held-out activation batches {hookpoint: (N, d)}: the first
    `calibration_tokens` tokens calibrate the thresholds, the next `max_tokens` are measured."""
    calibrators = [ThresholdCalibrator(s.sae.d_sae) for s in runtime.stages]
    thresholds: list[Tensor] | None = None
    active: list[list[Tensor]] = [[] for _ in runtime.stages]
    seen = 0
    for batch in batches:
        codes = stage_codes(runtime, batch)
        n = codes[0].shape[0]
        split = min(max(calibration_tokens - seen, 0), n)
        stop = min(n, calibration_tokens + max_tokens - seen)
        for calibrator, z in zip(calibrators, codes, strict=True):
            calibrator.update(z[:split])
        if stop > split:
            thresholds = thresholds or [c.thresholds(relative) for c in calibrators]
            for kept, z, theta in zip(active, codes, thresholds, strict=True):
                kept.append(binarize(z[split:stop], theta).cpu())
        seen += n
        if seen >= calibration_tokens + max_tokens:
            break
    if thresholds is None:  # not worth failing a finished training run over: report no value
        logger.warning("mean |φ| not measured: the held-out tokens (%d) ran out within the %d calibration tokens",
                       seen, calibration_tokens)
        return [{"mean_abs_phi": None, "phi_tokens": 0, "phi_calibration_tokens": seen} for _ in runtime.stages]
    return [phi_from_active(torch.cat(kept), block=block) | {"phi_calibration_tokens": calibration_tokens}
            for kept in active]


def heldout_activations(host: HostModel, hookpoints: Sequence[str], documents: Iterable[Document], *,
                        context_length: int, batch_size: int) -> Iterator[dict[str, Tensor]]:
    """{hookpoint: (n, d)} per batch of held-out windows, real (non-padding, non-special) tokens only."""
    pad_id = host.tokenizer.pad_token_id if host.tokenizer.pad_token_id is not None else 0
    special = torch.tensor(special_token_ids(host.tokenizer), dtype=torch.int64)
    for batch in batch_windows(iter_windows(host.tokenizer, documents, context_length), batch_size, pad_id):
        keep = (batch.attention_mask.bool() & ~torch.isin(batch.input_ids, special)).to(host.device)  # (B, T)
        with torch.no_grad():
            captures = host.forward(batch.input_ids, reads=list(hookpoints),
                                    attention_mask=batch.attention_mask).captures
        yield {hp: captures[hp][keep] for hp in hookpoints}


def cooccurrence_metrics(host: HostModel, runtime: StackRuntime, documents: Iterable[Document], *,
                         context_length: int, batch_size: int, max_tokens: int,
                         calibration_tokens: int | None = None, relative: float = DEFAULT_RELATIVE,
                         block: int = 1024) -> list[dict[str, Any]]:
    """Per stage mean |φ| on held-out documents: thresholds from the first `calibration_tokens` (default
    max_tokens // 4) real tokens, φ over the next `max_tokens` (fewer when the documents run out)."""
    batches = heldout_activations(host, runtime.hookpoints, documents, context_length=context_length,
                                  batch_size=batch_size)
    return stage_cooccurrence(runtime, batches, max_tokens=max_tokens, relative=relative, block=block,
                              calibration_tokens=max_tokens // 4 if calibration_tokens is None else calibration_tokens)


def stack_cooccurrence(stack_dir: str | Path, *, max_tokens: int = 16_384, calibration_tokens: int | None = None,
                       relative: float = DEFAULT_RELATIVE, block: int = 1024) -> list[dict[str, Any]]:
    """Per stage mean |φ| of a finished stack on the eval split of its training corpus, with more tokens than
    training's evaluation uses (the noise floor falls as 1/sqrt(n); the default corpus's eval split holds
    about 20k tokens, so more is not available there); the host model is the one the stack names."""
    held = open_held_out(stack_dir)
    return cooccurrence_metrics(held.host, StackRuntime.from_loaded(held.stack), held.documents,
                                context_length=held.context_length, batch_size=held.batch_size, max_tokens=max_tokens,
                                calibration_tokens=calibration_tokens, relative=relative, block=block)
