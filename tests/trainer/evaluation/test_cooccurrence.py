"""Mean |φ| co-occurrence: the blocked computation against a dense brute force, the calibration rule, and
the calibration/measurement split on a stack runtime."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.sae.base import SAEConfig
from core.sae.registry import build_sae
from core.stack.runtime import RuntimeStage, StackRuntime
from trainer.evaluation.cooccurrence import (
    binarize,
    calibrate_thresholds,
    mean_abs_phi,
    phi_stats,
    stage_cooccurrence,
)


def brute_force(active: np.ndarray) -> float:
    """Mean |φ| over pairs i < j from the full dense H × H φ matrix (φ is Pearson's r of binary data)."""
    varying = active.std(axis=0) > 0
    phi = np.corrcoef(active[:, varying].T.astype(np.float64))
    upper = np.triu_indices(phi.shape[0], k=1)
    return float(np.abs(phi[upper]).mean())


def correlated_codes(n: int = 600, h: int = 37) -> torch.Tensor:
    """Signed codes with shared causes (so φ is far from 0), a never-firing and an always-firing latent."""
    causes = torch.randn(n, 5)
    z = causes @ torch.randn(5, h) + 0.5 * torch.randn(n, h) - 1.0  # (n, h)
    z = torch.where(z.abs() > 1.2, z, torch.zeros_like(z))
    z[:, 3] = 0.0
    z[:, 7] = 2.5
    return z


@pytest.mark.parametrize("block", [1, 5, 16, 37, 64])
def test_blocked_phi_matches_the_dense_brute_force(block: int):
    z = correlated_codes()
    thresholds = calibrate_thresholds(z[:200])
    codes = z[200:]
    active = binarize(codes, thresholds).numpy()
    stats = phi_stats(codes, thresholds, block=block)
    assert stats["mean_abs_phi"] == pytest.approx(brute_force(active), rel=1e-9)
    assert (stats["phi_never_fire"], stats["phi_always_fire"], stats["phi_latents"]) == (1, 1, 35)
    assert stats["phi_pairs"] == 35 * 34 // 2 and stats["phi_tokens"] == 400
    chunks = [codes[i : i + 64] for i in range(0, 400, 64)]
    assert mean_abs_phi(chunks, thresholds, block=block) == pytest.approx(stats["mean_abs_phi"], rel=1e-9)


def test_independent_latents_sit_at_the_noise_floor_and_copies_at_one():
    generator = torch.Generator().manual_seed(1)
    fires = (torch.rand(4000, 20, generator=generator) < 0.3).float()
    stats = phi_stats(fires, torch.zeros(20), block=7)
    assert stats["mean_abs_phi"] == pytest.approx(stats["phi_noise_floor"], rel=0.25)
    assert mean_abs_phi(torch.cat([fires[:, :1], fires[:, :1]], dim=1), torch.zeros(2)) == pytest.approx(1.0)
    assert math.isnan(mean_abs_phi(torch.ones(10, 3), torch.zeros(3)))  # nothing varies: no pairs


def test_thresholds_are_a_fraction_of_the_mean_active_magnitude():
    z = torch.tensor([[1.0, 0.0, -4.0], [3.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    thresholds = calibrate_thresholds([z[:2], z[2:]], relative=0.5)
    torch.testing.assert_close(thresholds, torch.tensor([1.0, 0.0, 1.5]))  # never fired: any non-zero counts
    probe = torch.tensor([[0.9, 0.1, -1.6], [1.1, 0.0, 1.4]])
    assert binarize(probe, thresholds).tolist() == [[False, True, True], [True, False, False]]


def test_stage_cooccurrence_calibrates_on_the_first_tokens_and_measures_the_next():
    sae = build_sae(SAEConfig(architecture="relu", d_in=8, d_sae=24, k=4))
    runtime = StackRuntime([RuntimeStage(0, "s", "blocks.0.hook_resid_post", sae, 2.0)])
    h = torch.randn(300, 8)
    batches = [{"blocks.0.hook_resid_post": h[i : i + 70]} for i in range(0, 300, 70)]
    [stats] = stage_cooccurrence(runtime, batches, calibration_tokens=100, max_tokens=150, block=10)
    with torch.no_grad():
        codes = sae.encode(2.0 * h)  # (300, 24)
    expected = phi_stats(codes[100:250], calibrate_thresholds(codes[:100]))
    assert stats["phi_tokens"] == 150 and stats["phi_calibration_tokens"] == 100
    assert stats["mean_abs_phi"] == pytest.approx(expected["mean_abs_phi"], rel=1e-9)
    [short] = stage_cooccurrence(runtime, batches, calibration_tokens=1000, max_tokens=10)  # held-out text ran out
    assert short == {"mean_abs_phi": None, "phi_tokens": 0, "phi_calibration_tokens": 300}
