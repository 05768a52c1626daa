"""The stack runtime: chain reconstruction, error-preserving edits, no re-expression of edits downstream
in a residualized stack, and residual stacks on disk."""

from __future__ import annotations

import json
import math

import pytest
import torch

from core.sae import SAEConfig, build_sae
from core.stack.affine import AffineMap
from core.stack.manifest import StackError
from core.stack.reader import read_stack
from core.stack.runtime import RuntimeStage, StackRuntime
from core.stack.writer import StageSpec, write_stack
from trainer.data.synthetic import sparse_dictionary_data
from trainer.training.affine_fit import MomentAccumulator, fit_affine
from trainer.training.optimization import fit_in_memory

D = 16


def random_sae(d: int = D, d_sae: int = 48, architecture: str = "topk", seed: int = 0):
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(architecture=architecture, d_in=d, d_sae=d_sae, k=6))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae.eval()


def perfect_sae(d: int):
    """A ReLU SAE that reconstructs exactly: z = [relu(x), relu(−x)], x̂ = z⁺ − z⁻."""
    sae = build_sae(SAEConfig(architecture="relu", d_in=d, d_sae=2 * d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def random_affine(d_out: int = D, d_in: int = D, seed: int = 1) -> AffineMap:
    g = torch.Generator().manual_seed(seed)
    return AffineMap(torch.randn(d_out, d_in, generator=g) * 0.3, torch.randn(d_out, generator=g), 0.1, 0.8, 2.5)


def residual_runtime(sae0=None, sae1=None, affine=None) -> StackRuntime:
    affine = affine or random_affine()
    return StackRuntime([
        RuntimeStage(0, "a", "blocks.1.hook_resid_post", sae0 or random_sae(seed=0), 1.7),
        RuntimeStage(1, "b", "blocks.2.hook_resid_post", sae1 or random_sae(seed=1), affine.residual_scale, 0, affine),
    ])


def test_reconstruction_in_activation_space_is_the_chain_formula():
    runtime = residual_runtime()
    h0, h1 = torch.randn(32, D), torch.randn(32, D)
    results = runtime.decompose({"blocks.1.hook_resid_post": h0, "blocks.2.hook_resid_post": h1})
    stage0, stage1 = runtime.stages
    assert torch.allclose(results[0].recon, stage0.sae.decode(stage0.sae.encode(h0 * 1.7)) / 1.7, atol=1e-6)
    a = stage1.affine
    r = a.residual_scale * (h1 - h0 @ a.A.T - a.c)
    r_hat = stage1.sae.decode(stage1.sae.encode(r))
    assert torch.allclose(results[1].sae_input, r, atol=1e-5)
    assert torch.allclose(results[1].recon, h0 @ a.A.T + a.c + r_hat / a.residual_scale, atol=1e-5)
    assert torch.allclose(results[1].error, h1 - results[1].recon)


def test_an_edit_moves_only_the_edited_features_and_keeps_the_error():
    runtime = residual_runtime()
    stage = runtime.stages[1]
    h_prev, h = torch.randn(8, D), torch.randn(8, D)
    z = runtime.encode(stage, h, h_prev)
    feature = int(z.abs().sum(0).argmax())

    def pin(codes: torch.Tensor) -> torch.Tensor:
        out = codes.clone()
        out[:, feature] = 5.0
        return out

    h_new, z_old, z_new = runtime.apply_edit(stage, h, h_prev, pin)
    expected = h + (5.0 - z_old[:, feature:feature + 1]) * stage.sae.W_dec[feature] / stage.input_scale
    assert torch.allclose(h_new, expected, atol=1e-5)
    before, after = runtime.run_stage(stage, h, h_prev), runtime.run_stage(stage, h_new, h_prev)
    # the reconstruction error of the unedited input is kept in the edited activation
    assert torch.allclose(h_new - (before.recon + runtime.edit_delta(stage, z_old, z_new)), before.error, atol=1e-5)
    assert after.codes.shape == z_old.shape


def _copy_layer_data(n: int = 65536, seed: int = 0):
    """Layer m is sparse dictionary data; layer m+1 copies it and adds sparse features of its own."""
    carried = sparse_dictionary_data(n, D, num_features=24, active=3.0, seed=seed)
    new = sparse_dictionary_data(n, D, num_features=24, active=2.0, seed=seed + 1)
    return carried.x, carried.x + new.x


def _fit_affine(h0: torch.Tensor, h1: torch.Tensor) -> AffineMap:
    fit, held = MomentAccumulator(D, D), MomentAccumulator(D, D)
    fit.update(h0[::2], h1[::2])
    held.update(h0[1::2], h1[1::2])
    return fit_affine(fit, held)


def _trained(data: torch.Tensor):
    sae = build_sae(SAEConfig("topk", D, 64, k=4))
    fit_in_memory(sae, data, steps=300)
    return sae.eval().requires_grad_(False)


def test_an_edit_is_re_expressed_by_a_plain_stack_but_not_by_a_residualized_one():
    h0, h1 = _copy_layer_data()
    sae0, plain1 = _trained(h0), _trained(h1)
    affine = _fit_affine(h0, h1)
    assert affine.r2_held_out > 0.5
    r = affine.residual(h0, h1)
    res1 = _trained(r)
    plain = StackRuntime([RuntimeStage(0, "a", "m", sae0, 1.0), RuntimeStage(1, "b", "m1", plain1, 1.0)])
    resae = StackRuntime([RuntimeStage(0, "a", "m", sae0, 1.0),
                          RuntimeStage(1, "b", "m1", res1, affine.residual_scale, 0, affine)])
    x0, x1 = h0[:256], h1[:256]
    feature = int(sae0.encode(x0).abs().sum(0).argmax())

    def boost(codes: torch.Tensor) -> torch.Tensor:
        out = codes.clone()
        out[:, feature] += 3.0
        return out

    edited0, _, _ = plain.apply_edit(plain.stages[0], x0, None, boost)
    edited1 = x1 + (edited0 - x0)  # layer m+1 copies layer m, so the edit flows on
    moved = {}
    for name, runtime in (("plain", plain), ("resae", resae)):
        stage = runtime.stages[1]
        z_clean = runtime.encode(stage, x1, x0)
        z_edit = runtime.encode(stage, edited1, edited0)  # the residual reads what flowed at layer m
        moved[name] = float((z_edit - z_clean).norm() / z_clean.norm())
    # the residual stage moves only by the affine fit's own error (A ≈ I from finite samples)
    assert moved["resae"] < 0.2, moved
    assert moved["plain"] > 1.0, moved
    assert moved["plain"] > 5 * moved["resae"], moved


def test_residual_stacks_round_trip_and_bad_sources_are_refused(tmp_path):
    from tests.core.stack.test_stack import identity

    runtime = residual_runtime()
    specs = [StageSpec(s.sae, s.hookpoint, s.input_scale, name=s.name, residual_of=s.residual_of, affine=s.affine)
             for s in runtime.stages]
    path = write_stack(tmp_path / "stack", "resae", identity(), specs, metrics={"multi_tf_delta_ce": 0.5})
    loaded = read_stack(path)
    assert loaded.metrics == {"multi_tf_delta_ce": 0.5}
    assert loaded.stages[0].residual_of is None and loaded.stages[1].residual_of == 0
    assert torch.equal(loaded.stages[1].affine.A, runtime.stages[1].affine.A)
    assert math.isclose(loaded.stages[1].affine.residual_scale, 2.5)
    back = StackRuntime.from_loaded(loaded)
    acts = {"blocks.1.hook_resid_post": torch.randn(4, D), "blocks.2.hook_resid_post": torch.randn(4, D)}
    assert torch.allclose(back.decompose(acts)[1].recon, runtime.decompose(acts)[1].recon, atol=1e-6)

    with pytest.raises(StackError, match="earlier stage"):
        write_stack(tmp_path / "bad", "x", identity(), [StageSpec(random_sae(), "blocks.1.hook_resid_post", 2.5,
                                                                   residual_of=0, affine=random_affine())])
    with pytest.raises(StackError, match="residual scale"):
        bad = StageSpec(random_sae(), "blocks.2.hook_resid_post", 1.0, residual_of=0, affine=random_affine())
        write_stack(tmp_path / "bad", "x", identity(), [specs[0], bad])
    data = json.loads((path / "stack.json").read_text())
    data["stages"][1]["residual"]["from_stage"] = 1
    (path / "stack.json").write_text(json.dumps(data))
    with pytest.raises(StackError, match="from_stage"):
        read_stack(path)


def test_the_runtime_refuses_inconsistent_stages():
    with pytest.raises(ValueError, match="earlier stage"):
        StackRuntime([RuntimeStage(0, "a", "x", random_sae(), 1.0, 0, random_affine())])
    with pytest.raises(ValueError, match="A is"):
        StackRuntime([RuntimeStage(0, "a", "x", random_sae(), 1.0),
                      RuntimeStage(1, "b", "y", random_sae(), 2.5, 0, random_affine(d_in=D + 1))])
    with pytest.raises(ValueError, match="needs the activation"):
        residual_runtime().encode(residual_runtime().stages[1], torch.randn(2, D))
