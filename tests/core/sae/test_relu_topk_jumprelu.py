"""ReLU, TopK, BatchTopK and JumpReLU SAEs: ground-truth recovery on synthetic data, plus unit checks
of the sparsity mechanisms (exact top-k, batch top-k and its calibrated threshold, the JumpReLU
straight-through estimators, AuxK, dead-latent resets) and of (de)serialisation."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch

from core.sae.base import SAEConfig, SparseAutoencoder, l0
from core.sae.batchtopk import BatchTopKSAE
from core.sae.jumprelu import JumpReLUSAE
from core.sae.registry import build_sae
from core.sae.relu import ReLUSAE
from core.sae.topk import TopKSAE, auxk_loss
from trainer.data.synthetic import SyntheticData, recovered_fraction, sparse_dictionary_data
from trainer.training.optimization import fit_in_memory, make_optimizer, train_step

CLASSES: dict[str, type[SparseAutoencoder]] = {
    "relu": ReLUSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "jumprelu": JumpReLUSAE,
}
LOSS_KEYS = {
    "relu": {"mse", "sparsity", "total"},
    "topk": {"mse", "aux", "total"},
    "batchtopk": {"mse", "aux", "total"},
    "jumprelu": {"mse", "sparsity", "total"},
}
D_IN, N_FEATURES, WIDTH = 32, 48, 96


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def synthetic() -> SyntheticData:
    """48 unit directions in R^32, about 3 active per sample with magnitudes in [0.5, 1.5]."""
    return sparse_dictionary_data(20_000, D_IN, N_FEATURES, active=3.0, seed=0)


def make(arch: str, **overrides: Any) -> SparseAutoencoder:
    settings: dict[str, Any] = {"d_in": D_IN, "d_sae": WIDTH, "k": 4, "aux_k": 32} | overrides
    return CLASSES[arch](SAEConfig(architecture=arch, **settings))


# Per architecture: config overrides and the floor on the recovered fraction (cosine > 0.9). Measured with
# exactly this setup (1000 steps, batch 256, lr 6e-3, one thread, ~1.5-2.5 s per fit): on data seed 0,
# relu 1.000 (L0 6.7), topk 1.000 (L0 3.8), batchtopk 0.979 (L0 3.0), jumprelu 1.000 (L0 3.4). Across data
# seeds 0-5 the minima were 1.000 / 1.000 / 0.979 / 1.000, FVE ≥ 0.91 and a first-10/last-100 loss ratio ≥ 5.
RECOVERY: dict[str, dict[str, float]] = {
    "relu": {"sparsity_coefficient": 0.3},
    "topk": {"k": 4},
    "batchtopk": {"k": 3},
    "jumprelu": {"sparsity_coefficient": 0.1},
}
RECOVERY_FLOOR = 0.9


@pytest.mark.parametrize("arch", list(CLASSES))
def test_recovers_ground_truth_directions(arch: str, synthetic: SyntheticData) -> None:
    sae = make(arch, **RECOVERY[arch])
    result = fit_in_memory(sae, synthetic.x, steps=1000, batch_size=256, lr=6e-3, seed=0)
    recovered = recovered_fraction(sae.W_dec.detach(), synthetic.dictionary, 0.9)
    assert recovered >= RECOVERY_FLOOR, f"{arch}: recovered {recovered:.3f} of the true directions"
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-100:]) / 100
    assert last < first / 3, f"{arch}: loss went from {first:.3f} to {last:.3f}"
    assert result.final_fve > 0.85
    assert 1.0 <= result.final_l0 <= 12.0


@pytest.mark.parametrize("arch", list(CLASSES))
def test_training_steps_keep_decoder_rows_unit_norm_and_report_named_losses(arch: str) -> None:
    sae = make(arch)
    optimizer = make_optimizer(sae, lr=1e-2)
    x = torch.randn(128, D_IN)
    dead = torch.zeros(WIDTH, dtype=torch.bool)
    dead[:10] = True
    for _ in range(5):
        out = train_step(sae, optimizer, x, dead_mask=dead)
    assert set(out.losses) == LOSS_KEYS[arch]
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(WIDTH))


def test_relu_loss_is_mse_plus_decoder_weighted_l1() -> None:
    sae = make("relu", sparsity_coefficient=0.5)
    with torch.no_grad():
        sae.W_dec.mul_(2.0)  # rows of norm 2: the L1 term must weigh them
    x = torch.randn(64, D_IN)
    out = sae(x, sparsity_scale=0.5)
    z = torch.relu(sae.pre_activation(x))
    torch.testing.assert_close(out.z, z)
    torch.testing.assert_close(out.losses["sparsity"], (2.0 * z).sum(dim=-1).mean())
    torch.testing.assert_close(out.losses["total"], out.losses["mse"] + 0.25 * out.losses["sparsity"])
    assert torch.equal(sae(x, sparsity_scale=0.0).losses["total"], out.losses["mse"])


def test_topk_keeps_exactly_k_latents_per_token() -> None:
    sae = make("topk", k=5)
    x = torch.randn(300, D_IN)
    z = sae.encode(x)
    assert torch.equal(l0(z), torch.full((300,), 5))
    # They are the 5 largest pre-activations of each token.
    pre = sae.pre_activation(x)
    smallest_kept = z.masked_fill(z == 0, float("inf")).min(dim=1).values
    largest_dropped = pre.masked_fill(z != 0, float("-inf")).max(dim=1).values
    assert (smallest_kept >= largest_dropped).all()
    out = sae(x)
    assert torch.equal(out.z, z)
    assert torch.equal(out.losses["aux"], torch.zeros(()))  # no dead mask given


def test_batchtopk_training_keeps_batch_k_on_average_and_calibrated_inference_is_close() -> None:
    sae = make("batchtopk", k=4)
    x = torch.randn(512, D_IN)
    sae.train()
    out = sae(x)
    z = out.z.detach()
    assert int(l0(z).sum()) == 512 * 4  # mean L0 is exactly k ...
    assert l0(z).min() < l0(z).max()  # ... but it varies per token
    # The threshold buffer followed the smallest kept activation (the first update sets it outright).
    kept = z[z != 0]
    assert float(sae.threshold) == pytest.approx(float(kept.min()))
    assert int(sae.threshold_updates) == 1

    threshold = sae.calibrate_threshold_(x)
    assert float(sae.threshold) == pytest.approx(threshold)
    assert float(l0(sae.encode(x)).float().mean()) == 4.0
    assert sae.calibrate_threshold_(x, chunk_size=100) == pytest.approx(threshold)
    held_out = torch.randn(2048, D_IN)
    assert float(l0(sae.encode(held_out)).float().mean()) == pytest.approx(4.0, abs=0.4)

    sae.eval()  # eval-mode forward uses the calibrated threshold, like encode
    assert torch.equal(sae(x).z, sae.encode(x))
    assert float(sae.threshold) == pytest.approx(threshold)  # and does not update it


def test_batchtopk_threshold_is_a_moving_average_during_training(synthetic: SyntheticData) -> None:
    sae = make("batchtopk", k=3)
    fit_in_memory(sae, synthetic.x, steps=300, batch_size=256, lr=3e-3)
    assert int(sae.threshold_updates) == 300
    assert float(sae.threshold) > 0
    # The training-time threshold already gives an inference L0 near k without calibration.
    assert float(l0(sae.encode(synthetic.x[:4096])).float().mean()) == pytest.approx(3.0, rel=0.25)
    assert {"threshold", "threshold_updates"} <= set(sae.state_dict())


def test_jumprelu_l0_term_trains_only_the_threshold() -> None:
    sae = make("jumprelu", bandwidth=0.5, threshold_init=0.2)
    x = torch.randn(256, D_IN)
    out = sae(x)
    out.losses["sparsity"].backward()
    assert sae.threshold.grad is not None and (sae.threshold.grad != 0).any()
    assert (sae.threshold.grad <= 0).all()  # raising θ lowers L0
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        grad = getattr(sae, name).grad
        assert grad is None or not grad.any(), f"L0 term leaked a gradient into {name}"

    sae.zero_grad(set_to_none=True)
    sae(x).losses["mse"].backward()  # reconstruction trains the encoder through the gate, and θ too
    assert sae.W_enc.grad is not None and sae.W_enc.grad.any()
    assert sae.threshold.grad is not None and sae.threshold.grad.any()


def test_jumprelu_threshold_gradient_only_near_the_threshold() -> None:
    sae = make("jumprelu", bandwidth=1e-3)
    x = torch.randn(64, D_IN)
    pre = sae.pre_activation(x).detach()  # (64, d_sae)
    latent = int(pre[0].argmax())  # a clearly positive π
    with torch.no_grad():
        sae.threshold.fill_(float(pre.abs().max()) + 1.0)  # every other latent: all π far below θ
        sae.threshold[latent] = pre[0, latent]  # this one: θ sits on a π, inside the kernel window
    sae(x).losses["sparsity"].backward()
    grad = sae.threshold.grad
    assert grad is not None and grad[latent] < 0
    others = torch.arange(WIDTH) != latent
    assert not grad[others].any()


def test_jumprelu_threshold_stays_positive() -> None:
    sae = make("jumprelu", sparsity_coefficient=0.0, threshold_init=1e-3)
    optimizer = make_optimizer(sae, lr=0.1)  # steps much larger than θ: reconstruction pulls θ down
    x = torch.randn(256, D_IN)
    with torch.no_grad():
        sae.threshold.fill_(1e-3)
    for _ in range(5):
        train_step(sae, optimizer, x)
        assert (sae.threshold >= JumpReLUSAE.min_threshold).all()
    with torch.no_grad():
        sae.threshold.fill_(-1.0)  # set by other means: encode still never lets a negative π through
    assert (sae.encode(x) >= 0).all()


def test_jumprelu_reset_dead_restores_initial_thresholds() -> None:
    sae = make("jumprelu", threshold_init=0.01)
    with torch.no_grad():
        sae.threshold.fill_(5.0)
    dead = torch.zeros(WIDTH, dtype=torch.bool)
    dead[[3, 7, 50]] = True
    assert sae.reset_dead_(dead) == 3
    assert torch.equal(sae.threshold[dead], torch.full((3,), 0.01))
    assert torch.equal(sae.threshold[~dead], torch.full((WIDTH - 3,), 5.0))
    for arch in ("relu", "topk", "batchtopk"):  # no reset mechanism: nothing changes
        other = make(arch)
        before = {k: v.clone() for k, v in other.state_dict().items()}
        assert other.reset_dead_(dead) == 0
        assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_auxk_is_zero_without_dead_latents_and_trains_only_dead_ones(arch: str) -> None:
    sae = make(arch, k=2, aux_k=8)
    x = torch.randn(128, D_IN)
    none_dead = torch.zeros(WIDTH, dtype=torch.bool)
    assert torch.equal(sae(x, dead_mask=none_dead).losses["aux"], torch.zeros(()))

    dead = torch.zeros(WIDTH, dtype=torch.bool)
    dead[:20] = True
    out = sae(x, dead_mask=dead)
    assert out.losses["aux"] > 0
    torch.testing.assert_close(out.losses["total"], out.losses["mse"] + sae.cfg.aux_k_coefficient * out.losses["aux"])
    sae.zero_grad(set_to_none=True)
    out.losses["aux"].backward()
    assert sae.W_enc.grad is not None and sae.W_dec.grad is not None
    assert sae.W_enc.grad[:, :20].any() and not sae.W_enc.grad[:, 20:].any()
    assert sae.W_dec.grad[:20].any() and not sae.W_dec.grad[20:].any()


def test_auxk_uses_the_top_aux_k_dead_activations() -> None:
    W_dec = torch.eye(4)  # (d_sae=4, d_in=4)
    acts = torch.tensor([[3.0, 2.0, 1.0, 0.5]])  # (N=1, d_sae)
    residual = torch.tensor([[0.0, 2.0, 1.0, 0.0]])
    dead = torch.tensor([False, True, True, True])
    # aux_k=2 picks latents 1 and 2 (2.0, 1.0), which reconstruct the residual exactly.
    assert float(auxk_loss(acts, residual, W_dec, dead, aux_k=2)) == 0.0
    # aux_k=1 picks latent 1 only: latent 2's part of the residual is left over.
    assert float(auxk_loss(acts, residual, W_dec, dead, aux_k=1)) == pytest.approx(1.0)
    assert float(auxk_loss(acts, residual, W_dec, None, aux_k=2)) == 0.0


@pytest.mark.parametrize("arch", list(CLASSES))
def test_encode_is_deterministic_non_negative_and_per_token(arch: str, synthetic: SyntheticData) -> None:
    sae = make(arch)
    fit_in_memory(sae, synthetic.x, steps=50, batch_size=256, lr=3e-3)
    x = synthetic.x[:512]
    z = sae.encode(x)
    assert torch.equal(z, sae.encode(x))
    assert (z >= 0).all()
    assert l0(z).float().mean() > 0
    # A token's code does not depend on the rest of the batch (BatchTopK included, via its threshold).
    torch.testing.assert_close(sae.encode(x[:7]), z[:7], atol=1e-5, rtol=0)
    assert torch.equal(l0(sae.encode(x[:7])), l0(z[:7]))


@pytest.mark.parametrize("arch", list(CLASSES))
def test_state_dict_round_trip_reproduces_encode(arch: str, synthetic: SyntheticData) -> None:
    sae = make(arch)
    fit_in_memory(sae, synthetic.x, steps=50, batch_size=256, lr=3e-3)
    if isinstance(sae, JumpReLUSAE):
        assert sae.threshold.std() > 0  # learned per latent, so the round trip is meaningful
    clone = make(arch)
    clone.load_state_dict(sae.state_dict())
    x = synthetic.x[:256]
    assert torch.equal(clone.encode(x), sae.encode(x))
    if isinstance(sae, BatchTopKSAE):
        assert float(sae.threshold) > 0 and torch.equal(clone.threshold, sae.threshold)


ARCHITECTURES_PRESENT = all(
    importlib.util.find_spec(f"core.sae.{name}") is not None for name in ("gated", "sa_gsae")
)


@pytest.mark.skipif(not ARCHITECTURES_PRESENT, reason="the gated and SA-GSAE modules are not written yet")
@pytest.mark.parametrize("arch", list(CLASSES))
def test_build_sae_builds_each_architecture(arch: str) -> None:
    cfg = SAEConfig(architecture=arch, d_in=D_IN, d_sae=WIDTH, k=4)
    sae = build_sae(cfg)
    assert type(sae) is CLASSES[arch]
    assert sae.cfg == cfg and sae.architecture == arch and not sae.signed
    assert sae.encode(torch.randn(3, D_IN)).shape == (3, WIDTH)


def test_top_k_by_magnitude_keeps_signs():
    from core.sae import top_k_by_magnitude

    values, indices = top_k_by_magnitude(torch.tensor([[0.5, -3.0, 0.0, 2.0]]), 2)
    assert values.tolist() == [[-3.0, 2.0]] and indices.tolist() == [[1, 3]]
