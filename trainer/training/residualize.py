"""ReSAE preparation: fit the affine predictors between adjacent selected hookpoints on the calibration
split, before any SAE trains (docs/methods.md §A.2, §A.5).

The calibration activations are a separate store collected from the calibration documents (never the
training or evaluation documents). Every fifth document of it is held out to choose the ridge strength
by R², so the fit and the choice never see the same tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from core.stack.affine import AffineMap
from trainer.data.activations import ActivationManifest, iterate_batches
from trainer.data.shards import DOC_INDEX
from trainer.training.affine_fit import MomentAccumulator, fit_affine

logger = logging.getLogger(__name__)

HELD_OUT_EVERY = 5  # documents with doc_index % 5 == 0 choose α; the rest fit A, c
BATCH_ROWS = 4096


def fit_residual_maps(calibration: ActivationManifest, hookpoints: Sequence[str],
                      alphas: Sequence[float] | None = None) -> list[AffineMap]:
    """One map per adjacent pair: maps[m] predicts hookpoints[m + 1] from hookpoints[m] (raw activations)."""
    if len(hookpoints) < 2:
        raise ValueError("residualize needs at least two hookpoints: stage 0 is plain, later stages are residual")
    pairs = list(zip(hookpoints[:-1], hookpoints[1:], strict=True))
    fits = [MomentAccumulator(calibration.d(a), calibration.d(b)) for a, b in pairs]
    held = [MomentAccumulator(calibration.d(a), calibration.d(b)) for a, b in pairs]
    for batch in iterate_batches(calibration, list(hookpoints), BATCH_ROWS, normalize=False, metadata=True):
        is_held = batch[DOC_INDEX] % HELD_OUT_EVERY == 0  # (B,)
        for (a, b), fit, hold in zip(pairs, fits, held, strict=True):
            fit.update(batch[a][~is_held], batch[b][~is_held])
            hold.update(batch[a][is_held], batch[b][is_held])
    maps = []
    for (a, b), fit, hold in zip(pairs, fits, held, strict=True):
        if fit.n == 0 or hold.n == 0:
            raise ValueError(f"the calibration split is too small to fit {a} -> {b}: {fit.n} fit and {hold.n} "
                             "held-out tokens; raise corpus.calibration_fraction or stack.calibration_tokens")
        amap = fit_affine(fit, hold) if alphas is None else fit_affine(fit, hold, alphas)
        logger.info("affine %s -> %s: alpha %g, held-out R² %.3f, residual scale %.3g (%d fit, %d held-out tokens)",
                    a, b, amap.alpha, amap.r2_held_out, amap.residual_scale, fit.n, hold.n)
        maps.append(amap)
    return maps
