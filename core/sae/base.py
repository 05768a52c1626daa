"""The shared SAE base: parameters, decode, decoder-norm upkeep, config and the architecture registry.

Conventions every architecture and every consumer follows:
- activations x are (N, d_in), codes z are (N, d_sae) and may be signed (SA-GSAE): L0 counts z ≠ 0,
  top-k ranks by |z|, clamps may be negative;
- W_dec rows (one per latent) are kept unit norm: `normalize_decoder_()` after every optimiser step,
  `remove_parallel_decoder_grad_()` before it;
- `forward(x, ...)` is the training pass and returns (x̂, z, losses) where losses["total"] is what to
  minimise and the other entries are its named terms; `encode` is the inference-time encoder.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from core.sae.sparse_decode import decode_codes


@dataclass(frozen=True)
class SAEConfig:
    """Everything needed to rebuild an SAE; saved in the stack manifest (unknown keys are dropped on load)."""

    architecture: str
    d_in: int
    d_sae: int
    sparsity_coefficient: float = 1.0
    """λ of the sparsity penalty: L1 (relu, gated, sa_gsae) or L0 (jumprelu)."""
    k: int = 32
    """Active latents per token (topk) or on average per token (batchtopk)."""
    aux_k: int = 256
    """Dead latents used by the AuxK loss (topk, batchtopk)."""
    aux_k_coefficient: float = 1 / 32
    threshold_init: float = 0.001
    """Initial threshold θ₀ of the JumpReLU family (small, per the SA-GSAE recipe)."""
    bandwidth: float = 0.001
    """Rectangle-kernel bandwidth ε of the straight-through estimators."""
    per_side_thresholds: bool = False
    """SA-GSAE: separate θ⁺/θ⁻ instead of one symmetric θ."""
    tied_magnitude: bool = True
    """SA-GSAE: one magnitude scale r for both polarities (r⁺ = r⁻)."""
    aux_reconstruction: bool = True
    """Gated / SA-GSAE: auxiliary reconstruction through a frozen decoder (off only for the ablation)."""

    def __post_init__(self) -> None:
        if self.d_in < 1 or self.d_sae < 1:
            raise ValueError(f"d_in and d_sae must be positive, got {self.d_in} and {self.d_sae}")
        if not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be in [1, d_sae={self.d_sae}], got {self.k}")
        if self.sparsity_coefficient < 0 or self.threshold_init <= 0 or self.bandwidth <= 0:
            raise ValueError("sparsity_coefficient must be >= 0; threshold_init and bandwidth must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Rebuild from a saved dict, ignoring keys a newer format may have added."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class ForwardOutput(NamedTuple):
    x_hat: Tensor  # (N, d_in)
    z: Tensor  # (N, d_sae), signed for SA-GSAE
    losses: dict[str, Tensor]  # scalar terms; "total" is the objective


class SparseAutoencoder(nn.Module, abc.ABC):
    """Base class: W_enc (d_in, d_sae), b_enc (d_sae), W_dec (d_sae, d_in) unit rows, b_dec (d_in)."""

    architecture: ClassVar[str]
    signed: ClassVar[bool] = False
    sparse_codes: ClassVar[bool] = False
    """Codes have few non-zeros by construction (TopK, BatchTopK), so serving decodes them sparsely."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        W_dec = torch.empty(cfg.d_sae, cfg.d_in)
        nn.init.kaiming_uniform_(W_dec)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.t().contiguous())  # encoder initialised as the decoder's transpose
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def pre_activation(self, x: Tensor) -> Tensor:
        """(x − b_dec) W_enc + b_enc: (N, d_sae). One addmm for 2-D x: the bias rides in the matmul instead of
        a separate (N, d_sae) pass."""
        if x.dim() == 2:
            return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    @abc.abstractmethod
    def encode(self, x: Tensor) -> Tensor:
        """Inference-time codes (N, d_sae)."""

    def decode(self, z: Tensor) -> Tensor:
        return z @ self.W_dec + self.b_dec  # (N, d_in)

    def decode_codes(self, z: Tensor) -> Tensor:
        """`decode` for serving: through the active latents when the codes are sparse by construction
        (`sparse_codes`) and few (core/sae/sparse_decode.py); the same x̂ up to fp32 rounding: (N, d_in)."""
        if not self.sparse_codes:
            return self.decode(z)
        return decode_codes(z, self.W_dec) + self.b_dec

    @abc.abstractmethod
    def forward(self, x: Tensor, *, sparsity_scale: float = 1.0, dead_mask: Tensor | None = None) -> ForwardOutput:
        """Training pass. `sparsity_scale` ∈ [0, 1] warms the sparsity penalty up; `dead_mask` (d_sae,)
        marks latents that have not fired recently (used by AuxK)."""

    @torch.no_grad()
    def reset_dead_(self, dead_mask: Tensor) -> int:
        """Revive dead latents where the architecture has a mechanism for it; returns how many."""
        return 0

    @torch.no_grad()
    def init_b_dec_(self, sample: Tensor) -> None:
        """Start the decoder bias at the data mean (a cheap stand-in for the geometric median)."""
        self.b_dec.copy_(sample.mean(dim=0))

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Project out the radial part of W_dec's gradient, so a step rotates rows instead of growing them."""
        if self.W_dec.grad is None:
            return
        parallel = torch.linalg.vecdot(self.W_dec.grad, self.W_dec, dim=1)  # (d_sae,), one pass, no temporary
        self.W_dec.grad.addcmul_(self.W_dec, parallel.unsqueeze(1), value=-1.0)

    @staticmethod
    def mse(x: Tensor, x_hat: Tensor) -> Tensor:
        """Mean over tokens of ‖x − x̂‖²."""
        return (x - x_hat).pow(2).sum(dim=-1).mean()


def l0(z: Tensor) -> Tensor:
    """Active latents per token, counting z ≠ 0 (signed codes count once): (N,)."""
    return (z != 0).sum(dim=-1)


def top_k_by_magnitude(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest |z| per token, returned with their signs: values (N, k), indices (N, k)."""
    k = min(k, z.shape[-1])
    indices = z.abs().topk(k, dim=-1).indices
    return z.gather(-1, indices), indices
