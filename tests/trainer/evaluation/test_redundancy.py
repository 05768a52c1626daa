from __future__ import annotations

import math

import pytest
import torch

from trainer.evaluation.redundancy import decoder_redundancy, unit_rows, within_stage_max_cos


def test_identical_dictionaries_are_fully_redundant():
    w = torch.randn(40, 16) * torch.rand(40, 1) * 5  # any row norms
    out = decoder_redundancy(w, -w.clone())  # sign does not matter: |cos|
    assert out["redundancy_raw_mean_max_cos"] == pytest.approx(1.0, abs=1e-6)
    assert out["redundancy_raw_frac_above"] == 1.0
    assert "redundancy_mapped_mean_max_cos" not in out  # no A given
    mapped = decoder_redundancy(w, w, torch.eye(16))
    assert mapped["redundancy_mapped_mean_max_cos"] == pytest.approx(1.0, abs=1e-6)
    assert mapped["redundancy_mapped_frac_above"] == 1.0


def test_orthogonal_dictionaries_are_not_redundant():
    basis = torch.linalg.qr(torch.randn(32, 32)).Q.T  # (32, 32) orthonormal rows
    out = decoder_redundancy(basis[:16] * 3, basis[16:])
    assert out["redundancy_raw_mean_max_cos"] == pytest.approx(0.0, abs=1e-6)
    assert out["redundancy_raw_frac_above"] == 0.0


def test_planted_copy_through_A_is_found_only_by_the_mapped_metric():
    d = 24
    A = torch.linalg.qr(torch.randn(d, d)).Q  # a rotation: A d_k is far from d_k in general
    previous = torch.randn(50, d)
    current = torch.randn(50, d)
    current[:10] = (A @ previous[:10].T).T * 0.3  # 10 atoms carried forward through the predictor
    out = decoder_redundancy(previous, current, A, threshold=0.9)
    assert out["redundancy_mapped_frac_above"] == pytest.approx(10 / 50)
    assert out["redundancy_raw_frac_above"] == 0.0
    assert out["redundancy_mapped_mean_max_cos"] > out["redundancy_raw_mean_max_cos"]


def test_different_widths_and_zero_atoms_give_no_nan():
    previous = torch.randn(30, 8)  # d_prev = 8
    current = torch.randn(20, 12)  # d_cur = 12
    A = torch.zeros(12, 8)
    A[:, 0] = 1.0  # maps everything off e_0 to ~0 ...
    previous[:5] = 0.0
    previous[5:10, 0] = 0.0  # ... and these atoms exactly to 0
    out = decoder_redundancy(previous, current, A)
    assert set(out) == {"redundancy_mapped_mean_max_cos", "redundancy_mapped_frac_above"}  # raw needs d_prev == d_cur
    assert all(math.isfinite(v) for v in out.values())
    assert unit_rows(torch.zeros(3, 4)).abs().sum() == 0
    with pytest.raises(ValueError, match="affine_A"):
        decoder_redundancy(previous, current, torch.zeros(8, 12))


def test_chunking_matches_one_block():
    previous, current = torch.randn(300, 16), torch.randn(257, 16)
    A = torch.randn(16, 16)
    whole = decoder_redundancy(previous, current, A, chunk=10_000)
    chunked = decoder_redundancy(previous, current, A, chunk=64)
    assert chunked == pytest.approx(whole, abs=1e-6)  # float32 blocks: BLAS sums in another order
    whole64 = decoder_redundancy(previous, current, A, chunk=10_000, dtype=torch.float64)
    assert decoder_redundancy(previous, current, A, chunk=64, dtype=torch.float64) == pytest.approx(whole64, abs=1e-12)
    assert within_stage_max_cos(current, chunk=50) == pytest.approx(within_stage_max_cos(current), abs=1e-6)


def test_within_stage_max_cos_excludes_self():
    basis = torch.eye(6)
    assert within_stage_max_cos(basis) == pytest.approx(0.0)
    dup = torch.cat([basis, 2 * basis[:3]])  # 3 atoms duplicated (twice the norm)
    assert within_stage_max_cos(dup) == pytest.approx(6 / 9)  # the 6 duplicated atoms reach 1, the rest 0
    assert within_stage_max_cos(torch.randn(1, 4)) == 0.0
