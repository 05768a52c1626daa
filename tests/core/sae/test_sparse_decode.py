"""The sparse TopK / BatchTopK training pass (core/sae/sparse_decode.py) against the dense formulation it
replaced, kept here as the reference: losses, codes, every parameter's gradient and one optimiser step agree
within fp32 tolerance, with and without dead latents (AuxK); plus the sparse decode of dense codes."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import Tensor

from core.sae.base import ForwardOutput, SAEConfig, SparseAutoencoder
from core.sae.batchtopk import BatchTopKSAE, batch_top_k_indices, keep_batch_top_k
from core.sae.registry import build_sae
from core.sae.sparse_decode import SparsePattern, decode_codes, sparse_decode
from core.sae.topk import auxk_loss, keep_top_k
from trainer.training.optimization import make_optimizer, train_step

D_IN, WIDTH, N = 24, 256, 96
TOL = {"rtol": 1e-5, "atol": 1e-5}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def dense_forward(self: SparseAutoencoder, x: Tensor, *, sparsity_scale: float = 1.0,
                  dead_mask: Tensor | None = None) -> ForwardOutput:
    """The dense reference: decode the full (N, H) code, AuxK through the dense pre-activations."""
    acts = torch.relu(self.pre_activation(x))  # (N, d_sae)
    select = keep_top_k if self.architecture == "topk" else keep_batch_top_k
    z = select(acts, self.cfg.k)
    x_hat = self.decode(z)
    mse = self.mse(x, x_hat)
    aux = auxk_loss(acts, x - x_hat, self.W_dec, dead_mask, self.cfg.aux_k)
    return ForwardOutput(x_hat, z, {"mse": mse, "aux": aux, "total": mse + self.cfg.aux_k_coefficient * aux})


def pair(arch: str, *, b_enc: float = 0.0, **overrides: int) -> tuple[SparseAutoencoder, SparseAutoencoder]:
    torch.manual_seed(0)
    settings = {"d_in": D_IN, "d_sae": WIDTH, "k": 8, "aux_k": 16} | overrides
    sae = build_sae(SAEConfig(architecture=arch, **settings))
    with torch.no_grad():
        sae.b_enc.normal_(b_enc, 0.1)
        sae.b_dec.normal_(0.0, 0.1)
    reference = copy.deepcopy(sae)
    reference.forward = types.MethodType(dense_forward, reference)  # type: ignore[method-assign]
    return sae, reference


def dead_mask(n_dead: int) -> Tensor | None:
    if n_dead == 0:
        return None
    mask = torch.zeros(WIDTH, dtype=torch.bool)
    mask[torch.randperm(WIDTH, generator=torch.Generator().manual_seed(1))[:n_dead]] = True
    return mask


CASES = [("topk", 0), ("topk", 10), ("topk", 40), ("batchtopk", 0), ("batchtopk", 10), ("batchtopk", 40)]


@pytest.mark.parametrize(("arch", "n_dead"), CASES)
@pytest.mark.parametrize("b_enc", [0.0, -3.0])  # -3: fewer than k positive pre-activations in many rows
def test_sparse_pass_matches_dense_losses_codes_and_gradients(arch: str, n_dead: int, b_enc: float) -> None:
    sae, reference = pair(arch, b_enc=b_enc)
    x = torch.randn(N, D_IN)
    dead = dead_mask(n_dead)
    out, ref = sae(x, dead_mask=dead), reference(x, dead_mask=dead)
    torch.testing.assert_close(out.z, ref.z, rtol=0, atol=0)
    torch.testing.assert_close(out.x_hat, ref.x_hat, **TOL)
    assert set(out.losses) == set(ref.losses)
    for name in out.losses:
        torch.testing.assert_close(out.losses[name], ref.losses[name], **TOL)
    if n_dead:
        assert float(out.losses["aux"].detach()) > 0
    out.losses["total"].backward()
    ref.losses["total"].backward()
    for (name, p), q in zip(sae.named_parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(("arch", "n_dead"), CASES)
def test_one_optimiser_step_matches_dense(arch: str, n_dead: int) -> None:
    sae, reference = pair(arch)
    x = torch.randn(N, D_IN)
    dead = dead_mask(n_dead)
    for model in (sae, reference):
        optimizer = make_optimizer(model, lr=1e-2)
        for _ in range(2):
            out = train_step(model, optimizer, x, dead_mask=dead)
        assert not out.z.requires_grad
    for (name, p), q in zip(sae.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, **TOL, msg=lambda m, name=name: f"{name}: {m}")


def test_input_gradient_and_dense_code_gradient() -> None:
    """Gradients also reach x (when it asks for one) and flow back through the dense code z and through x̂."""
    sae, reference = pair("topk")
    x = torch.randn(N, D_IN, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    weights = torch.randn(N, WIDTH)
    out, ref = sae(x, dead_mask=dead_mask(10)), reference(x_ref, dead_mask=dead_mask(10))
    (out.losses["total"] + (out.z * weights).sum() + out.x_hat.square().sum()).backward()
    (ref.losses["total"] + (ref.z * weights).sum() + ref.x_hat.square().sum()).backward()
    assert x.grad is not None and x_ref.grad is not None
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    torch.testing.assert_close(sae.W_enc.grad, reference.W_enc.grad, **TOL)


def test_batch_top_k_indices_is_the_one_stage_set_and_falls_back_when_a_row_saturates() -> None:
    acts = torch.relu(torch.randn(64, 512))
    expected = acts.flatten().topk(64 * 4, sorted=False).indices.sort().values
    assert torch.equal(batch_top_k_indices(acts, 4), expected)
    acts[3] += 100.0  # one token takes more than 4k of the batch budget: the candidates miss some
    expected = acts.flatten().topk(64 * 4, sorted=False).indices.sort().values
    assert torch.equal(batch_top_k_indices(acts, 4), expected)


def test_batchtopk_eval_forward_stays_dense_and_matches_encode() -> None:
    sae = build_sae(SAEConfig(architecture="batchtopk", d_in=D_IN, d_sae=WIDTH, k=8))
    assert isinstance(sae, BatchTopKSAE)
    x = torch.randn(N, D_IN)
    sae.calibrate_threshold_(x)
    sae.eval()
    assert torch.equal(sae(x).z, sae.encode(x))


@pytest.mark.parametrize("rows", [1, 8, N])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.5])
def test_decode_codes_matches_the_matmul(density: float, rows: int) -> None:
    """Sparse for few rows below SPARSE_DENSITY, the plain matmul otherwise and whenever a gradient is needed."""
    W_dec = torch.randn(WIDTH, D_IN)
    z = torch.randn(rows, WIDTH) * (torch.rand(rows, WIDTH) < density)
    with torch.no_grad():
        torch.testing.assert_close(decode_codes(z, W_dec), z @ W_dec, **TOL)
    W = W_dec.clone().requires_grad_()
    decode_codes(z, W).sum().backward()
    assert W.grad is not None


def test_sparse_decode_of_an_empty_pattern() -> None:
    pattern = SparsePattern.from_mask(torch.zeros(3, WIDTH, dtype=torch.bool))
    W_dec = torch.randn(WIDTH, D_IN, requires_grad=True)
    values = torch.zeros(0, requires_grad=True)
    out = sparse_decode(values, pattern, W_dec)
    assert torch.equal(out, torch.zeros(3, D_IN))
    out.sum().backward()
    assert W_dec.grad is not None and not W_dec.grad.any()


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu"])
def test_sae_decode_codes_serves_the_same_reconstruction(arch: str) -> None:
    """Serving decodes TopK/BatchTopK codes of a few tokens sparsely; others (and many tokens) by the matmul."""
    sae = build_sae(SAEConfig(architecture=arch, d_in=D_IN, d_sae=WIDTH, k=8)).requires_grad_(False)
    assert sae.sparse_codes == (arch != "relu")
    for rows in (1, 4, N):
        x = torch.randn(rows, D_IN)
        with torch.inference_mode():
            z = sae.encode(x)
            torch.testing.assert_close(sae.decode_codes(z), sae.decode(z), **TOL)
