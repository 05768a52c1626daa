"""The fused SA-GSAE step (core.sae.ste.sign_aware_code) against the formulation it replaced, kept here as the
reference: one `jumprelu` / `bi_step` autograd node per piece. Codes agree exactly; losses, every parameter's
gradient (θ's straight-through ones included) and one optimiser step agree within fp32 tolerance."""

from __future__ import annotations

import copy
import itertools
import types
from typing import Any

import pytest
import torch
from torch import Tensor

from core.sae.base import ForwardOutput, SAEConfig
from core.sae.sa_gsae import SignAwareGatedSAE
from core.sae.ste import bi_step, jumprelu
from trainer.training.optimization import make_optimizer, train_step

D_IN, WIDTH, N = 16, 48, 128
TOL = {"rtol": 1e-5, "atol": 1e-5}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_forward(self: SignAwareGatedSAE, x: Tensor, *, sparsity_scale: float = 1.0,
                      dead_mask: Tensor | None = None) -> ForwardOutput:
    """The previous SignAwareGatedSAE.forward, verbatim."""
    eps = self.cfg.bandwidth
    pi, magnitude = self._gate_and_magnitude(x)
    theta_pos, theta_neg = self.thresholds()
    gate = bi_step(pi, theta_pos, theta_neg, eps)
    z = gate * magnitude
    x_hat = self.decode(z)
    mse = self.mse(x, x_hat)
    if self.sparsity_penalty == "l1":
        gate_l1 = jumprelu(pi, theta_pos, eps) + jumprelu(-pi, theta_neg, eps)
        penalty = (gate_l1 * self.W_dec.norm(dim=1)).sum(dim=-1).mean()
    else:
        penalty = gate.sum(dim=-1).mean()
    if self.cfg.aux_reconstruction:
        phi = jumprelu(pi, theta_pos.detach(), eps) - jumprelu(-pi, theta_neg.detach(), eps)
        aux = self.mse(x, phi @ self.W_dec.detach() + self.b_dec.detach())
    else:
        aux = mse.new_zeros(())
    total = mse + sparsity_scale * self.cfg.sparsity_coefficient * penalty + aux
    return ForwardOutput(x_hat, z, {"mse": mse, "sparsity": penalty, "aux": aux, "total": total})


def pair(penalty: str, **overrides: Any) -> tuple[SignAwareGatedSAE, SignAwareGatedSAE]:
    """A fused SAE and a reference copy, with parameters spread out so that every branch is exercised: signed
    magnitudes that disagree with π's sign, and a wide kernel (ε = 0.3) so that many π fall near a threshold."""
    torch.manual_seed(0)
    cfg = SAEConfig("sa_gsae", D_IN, WIDTH, sparsity_coefficient=0.7, bandwidth=0.3, **overrides)
    sae = SignAwareGatedSAE(cfg, sparsity_penalty=penalty)  # type: ignore[arg-type]
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name.startswith("threshold"):
                p.uniform_(0.05, 0.6)
            elif name.startswith("r_mag"):
                p.normal_(0.0, 0.5)
            elif name in ("b_mag", "b_enc", "b_dec"):
                p.normal_(0.0, 0.3)
    reference = copy.deepcopy(sae)
    reference.forward = types.MethodType(reference_forward, reference)  # type: ignore[method-assign]
    return sae, reference


VARIANTS = [
    {"per_side_thresholds": per_side, "tied_magnitude": tied, "aux_reconstruction": aux}
    for per_side, tied, aux in itertools.product([False, True], [True, False], [True, False])
]


@pytest.mark.parametrize("penalty", ["l1", "l0"])
@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: "-".join(f"{k}={int(v)}" for k, v in o.items()))
def test_fused_step_matches_reference(penalty: str, overrides: dict[str, bool]) -> None:
    sae, reference = pair(penalty, **overrides)
    x = torch.randn(N, D_IN)
    out, ref = sae(x, sparsity_scale=0.6), reference(x, sparsity_scale=0.6)
    torch.testing.assert_close(out.z, ref.z, rtol=0, atol=0)
    torch.testing.assert_close(out.z, sae.encode(x), rtol=0, atol=0)
    for name in ref.losses:
        torch.testing.assert_close(out.losses[name], ref.losses[name], **TOL)
    out.losses["total"].backward()
    ref.losses["total"].backward()
    for (name, p), q in zip(sae.named_parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")
        if name.startswith("threshold"):
            assert p.grad.any(), "the kernel window should catch some π"


@pytest.mark.parametrize("overrides", [VARIANTS[0], VARIANTS[-1]])
def test_fused_optimiser_steps_match_reference(overrides: dict[str, bool]) -> None:
    sae, reference = pair("l1", **overrides)
    x = torch.randn(N, D_IN)
    for model in (sae, reference):
        optimizer = make_optimizer(model, lr=1e-2)
        for _ in range(2):
            train_step(model, optimizer, x, sparsity_scale=0.5)
    for (name, p), q in zip(sae.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, **TOL, msg=lambda m, name=name: f"{name}: {m}")


def test_separate_loss_terms_match_reference() -> None:
    """Each term on its own (so each backward branch is checked, not only their sum)."""
    sae, reference = pair("l1", per_side_thresholds=True, tied_magnitude=False)
    x = torch.randn(N, D_IN)
    for term in ("mse", "sparsity", "aux"):
        sae.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        sae(x).losses[term].backward()
        reference(x).losses[term].backward()
        for (name, p), q in zip(sae.named_parameters(), reference.parameters(), strict=True):
            if q.grad is None:
                assert p.grad is None or not p.grad.any(), f"{term}: {name}"
            else:
                assert p.grad is not None, f"{term}: {name}"
                torch.testing.assert_close(p.grad, q.grad, **TOL, msg=lambda m, n=name, t=term: f"{t}: {n}: {m}")
