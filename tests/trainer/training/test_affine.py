from __future__ import annotations

import json

import pytest
import torch

from trainer.training.affine_fit import AffineMap, MomentAccumulator, fit_affine


def _problem(d_in: int, d_out: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a_true = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    c_true = torch.randn(d_out, generator=g)
    return a_true, c_true


def _sample(a_true, c_true, n: int, noise: float, seed: int, offset: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, a_true.shape[1], generator=g) + offset
    y = x @ a_true.T + c_true + noise * torch.randn(n, a_true.shape[0], generator=g)
    return x, y


def _acc(x: torch.Tensor, y: torch.Tensor, batch: int | None = None) -> MomentAccumulator:
    acc = MomentAccumulator(x.shape[1], y.shape[1])
    for xs, ys in zip(x.split(batch or len(x)), y.split(batch or len(y)), strict=True):
        acc.update(xs, ys)
    return acc


def _direct_r2(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> float:
    x, y, a, c = x.double(), y.double(), a.double(), c.double()
    sse = (y - x @ a.T - c).pow(2).sum()
    return float(1 - sse / (y - y.mean(dim=0)).pow(2).sum())


def test_recovers_map_and_theoretical_r2():
    d_in, d_out, noise = 16, 12, 0.5
    a_true, c_true = _problem(d_in, d_out)
    amap = fit_affine(_acc(*_sample(a_true, c_true, 20000, noise, 1)), _acc(*_sample(a_true, c_true, 20000, noise, 2)))
    assert torch.allclose(amap.A, a_true, atol=0.02)
    assert torch.allclose(amap.c, c_true, atol=0.02)
    signal = a_true.pow(2).sum()
    r2_theory = float(signal / (signal + d_out * noise**2))  # x ~ N(0, I): Var(A*x) = ‖A*‖_F²
    assert amap.r2_held_out == pytest.approx(r2_theory, abs=0.01)
    assert amap.alpha <= 1e-3  # plentiful data: (almost) no ridge
    assert amap.A.dtype == torch.float32 and amap.A.shape == (d_out, d_in) and amap.c.shape == (d_out,)


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_moment_r2_equals_direct_r2(offset: float):
    a_true, c_true = _problem(10, 7)
    held_x, held_y = _sample(a_true, c_true, 3000, 0.3, 4, offset)
    held = _acc(held_x, held_y, batch=700)
    amap = fit_affine(_acc(*_sample(a_true, c_true, 3000, 0.3, 3, offset)), held)
    assert amap.r2_held_out == pytest.approx(_direct_r2(held_x, held_y, amap.A, amap.c), abs=1e-6)
    wrong_a, wrong_c = torch.randn(7, 10, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    assert held.r2(wrong_a, wrong_c) == pytest.approx(_direct_r2(held_x, held_y, wrong_a, wrong_c), rel=1e-6)


def test_streaming_equals_one_batch():
    a_true, c_true = _problem(8, 5)
    fit_xy, held_xy = _sample(a_true, c_true, 1000, 0.2, 5), _sample(a_true, c_true, 1000, 0.2, 6)
    one = fit_affine(_acc(*fit_xy), _acc(*held_xy))
    many = fit_affine(_acc(*fit_xy, batch=137), _acc(*held_xy, batch=91))
    assert torch.allclose(one.A, many.A, atol=1e-6) and torch.allclose(one.c, many.c, atol=1e-6)
    assert one.alpha == many.alpha
    assert one.r2_held_out == pytest.approx(many.r2_held_out, abs=1e-9)
    assert one.residual_scale == pytest.approx(many.residual_scale, rel=1e-9)


def test_ridge_selection_prefers_regularisation_when_overfitting():
    d_in, d_out, noise = 64, 16, 1.0
    a_true, c_true = _problem(d_in, d_out, seed=7)
    amap = fit_affine(_acc(*_sample(a_true, c_true, 96, noise, 8)), _acc(*_sample(a_true, c_true, 4000, noise, 9)))
    assert amap.alpha >= 1e-2
    assert amap.r2_held_out > amap.r2_by_alpha[0.0] + 0.05
    assert set(amap.r2_by_alpha) == {0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0}


def test_residual_is_unit_rms_and_reconstruct_inverts_it():
    a_true, c_true = _problem(12, 9)
    held_x, held_y = _sample(a_true, c_true, 4000, 0.4, 11, offset=3.0)
    amap = fit_affine(_acc(*_sample(a_true, c_true, 4000, 0.4, 10, offset=3.0)), _acc(held_x, held_y))
    r = amap.residual(held_x, held_y)  # (N, d_out)
    assert r.shape == held_y.shape
    assert float(r.double().pow(2).sum(dim=-1).mean()) == pytest.approx(9, rel=1e-4)  # E‖s·r‖² = d_out
    fresh_x, fresh_y = _sample(a_true, c_true, 4000, 0.4, 12, offset=3.0)
    assert float(amap.residual(fresh_x, fresh_y).pow(2).sum(dim=-1).mean()) == pytest.approx(9, rel=0.05)
    assert torch.allclose(amap.reconstruct(held_x, r), held_y, atol=1e-5)
    assert torch.allclose(amap.predict(held_x) + r / amap.residual_scale, held_y, atol=1e-5)


def test_tensors_and_metadata_round_trip():
    a_true, c_true = _problem(6, 4)
    amap = fit_affine(_acc(*_sample(a_true, c_true, 500, 0.1, 13)), _acc(*_sample(a_true, c_true, 500, 0.1, 14)))
    tensors = amap.tensors()
    assert set(tensors) == {"A", "c"}
    meta = json.loads(json.dumps(amap.metadata()))  # survives stack.json
    back = AffineMap.from_tensors(tensors, meta)
    assert torch.equal(back.A, amap.A) and torch.equal(back.c, amap.c)
    assert (back.alpha, back.r2_held_out, back.residual_scale) == (amap.alpha, amap.r2_held_out, amap.residual_scale)
    assert back.r2_by_alpha == amap.r2_by_alpha


def test_collinear_inputs_do_not_crash():
    a_true, c_true = _problem(6, 4)
    fit_x, fit_y = _sample(a_true, c_true, 800, 0.1, 15)
    held_x, held_y = _sample(a_true, c_true, 800, 0.1, 16)

    def dup(x: torch.Tensor) -> torch.Tensor:  # a duplicated column makes C_xx exactly singular
        return torch.cat([x, x[:, :1]], dim=1)

    amap = fit_affine(_acc(dup(fit_x), fit_y), _acc(dup(held_x), held_y))
    assert all(r == r for r in amap.r2_by_alpha.values())  # no NaN
    assert torch.isfinite(amap.A).all() and amap.r2_by_alpha[0.0] > 0.9 and amap.r2_held_out > 0.9
    assert torch.allclose(amap.A[:, 0] + amap.A[:, -1], a_true[:, 0], atol=0.02)  # the pair shares the weight
