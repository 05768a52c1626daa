"""Inference-time optimisation: gradient pursuit recovers planted sparse codes, never increases the
error against the encoder, respects the per-token budget and the sign convention of the architecture."""

from __future__ import annotations

import pytest
import torch

from core.sae import SAEConfig, build_sae
from core.sae.base import l0
from core.stack.runtime import RuntimeStage, StackRuntime
from trainer.evaluation.ito import gradient_pursuit, ito_metrics, refine, refine_stage
from trainer.training.affine_fit import MomentAccumulator, fit_affine

D, H = 32, 64


def _sae(architecture: str, **kwargs):
    torch.manual_seed(0)
    return build_sae(SAEConfig(architecture, D, H, **kwargs)).requires_grad_(False).eval()


@pytest.mark.parametrize(("architecture", "kwargs"), [("topk", {"k": 4}), ("relu", {}), ("sa_gsae", {})])
def test_refined_codes_never_increase_the_error_and_respect_the_budget(architecture: str, kwargs: dict) -> None:
    sae = _sae(architecture, **kwargs)
    x = torch.randn(300, D) * 2
    codes = sae.encode(x)
    result = refine(sae, x)
    encoder_error = (x - sae.decode(codes)).norm(dim=-1)
    ito_error = result.error(x).norm(dim=-1)
    assert bool((ito_error <= encoder_error + 1e-5).all())
    assert torch.equal(result.budget, l0(codes)) and bool((l0(result.codes) <= result.budget).all())
    assert bool(result.improved.any()), "pursuit should beat an untrained encoder somewhere"
    torch.testing.assert_close(result.recon, sae.decode(result.codes))
    if sae.signed:
        assert bool((result.codes[result.improved] < 0).any())
    else:
        assert bool((result.codes >= 0).all())


def test_pursuit_recovers_planted_sparse_codes_that_the_encoder_misses() -> None:
    sae = _sae("topk", k=3)
    g = torch.Generator().manual_seed(1)
    n = 200
    true = torch.zeros(n, H)
    atoms = torch.stack([torch.randperm(H, generator=g)[:3] for _ in range(n)])  # (n, 3)
    true.scatter_(1, atoms, 1.0 + 2.0 * torch.rand(n, 3, generator=g))
    x = true @ sae.W_dec + sae.b_dec  # (n, D): exactly 3 positive atoms each
    result = refine(sae, x)
    encoder_error = (x - sae.decode(sae.encode(x))).pow(2).sum(-1)
    ito_error = result.error(x).pow(2).sum(-1)
    assert float(ito_error.sum()) < 0.1 * float(encoder_error.sum())


def test_signed_pursuit_finds_negative_codes_and_non_negative_pursuit_does_not() -> None:
    sae = _sae("sa_gsae")
    x = (-2.0 * sae.W_dec[3] + 1.5 * sae.W_dec[7] + sae.b_dec)[None]  # (1, D)
    budget = torch.tensor([2])
    signed = gradient_pursuit(sae.W_dec, sae.b_dec, x, budget, signed=True)
    assert float(signed[0, 3]) < -1.0 and float(signed[0, 7]) > 1.0 and int(l0(signed)[0]) <= 2
    unsigned = gradient_pursuit(sae.W_dec, sae.b_dec, x, budget, signed=False)
    assert bool((unsigned >= 0).all()) and int(l0(unsigned)[0]) <= 2
    zero = gradient_pursuit(sae.W_dec, sae.b_dec, x, torch.tensor([0]), signed=True)
    assert not bool(zero.any())  # a token whose encoder fires nothing gets no atoms either


def test_ito_on_a_residual_stage_and_its_report() -> None:
    plain, residual_sae = _sae("topk", k=4), _sae("topk", k=4)
    h0 = torch.randn(600, D)
    h1 = 0.5 * h0 + 0.5 * torch.randn(600, D)
    fit, held = MomentAccumulator(D, D), MomentAccumulator(D, D)
    fit.update(h0[::2], h1[::2])
    held.update(h0[1::2], h1[1::2])
    affine = fit_affine(fit, held)
    runtime = StackRuntime([RuntimeStage(0, "a", "blocks.0.hook_resid_post", plain, 1.0),
                            RuntimeStage(1, "b", "blocks.1.hook_resid_post", residual_sae, affine.residual_scale,
                                         0, affine)])
    encoded = runtime.run_stage(runtime.stages[1], h1, h0)
    refined = refine_stage(runtime, runtime.stages[1], h1, h0)
    assert bool((refined.error_norm() <= encoded.error_norm() + 1e-5).all())
    torch.testing.assert_close(refined.error, h1 - refined.recon)
    batches = [{"blocks.0.hook_resid_post": h0[i:i + 200], "blocks.1.hook_resid_post": h1[i:i + 200]}
               for i in range(0, 600, 200)]
    report = ito_metrics(runtime, batches)
    for stage in report:
        assert 0.0 <= stage["ito_total_error_reduction"] < 1.0
        assert stage["ito_fvu_total"] <= stage["ito_encoder_fvu_total"]
        assert stage["ito_l0"] <= stage["ito_encoder_l0"] == pytest.approx(4.0)
        assert stage["ito_nonlinear_error_reduction"] == pytest.approx(
            1 - stage["ito_fvu_nonlinear"] / stage["ito_encoder_fvu_nonlinear"])
