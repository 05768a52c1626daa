"""The frozen error predictors of a stage (SAE dark matter, docs/methods.md §C), as the stack stores them.

Every probe reads x, the stage's SAE input (`StackRuntime.sae_input`: s·h, or s·(h − A h_prev − c) for a
residual stage), and predicts in activation units, the units of the runtime's error norm ‖h − ĥ‖:

    norm probe      ‖h − ĥ‖ ≈ x·w + b                     served: relu(x·w + b), one dot product per token
    vector probe    h − ĥ ≈ x Wᵀ + c                       the linear part of the error (evaluation only)
    previous probe  ‖h − ĥ‖ ≈ [x, t·ĥ_prev]·v + b_prev     ĥ_prev = the previous stage's reconstruction
                                                            (activation space), t = prev_input_scale

This module holds only the fitted tensors and their scalars (torch-only: the service imports it with the
stack format); fitting lives in trainer/training/error_predictors.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from core.stack.affine import AffineMap

TARGET = "activation_error_norm"  # ‖h − ĥ‖ in activation units, what StageResult.error_norm() returns
INPUT = "sae_input"  # x = StackRuntime.sae_input(stage, h, prev)


@dataclass(frozen=True, eq=False)
class ErrorPredictor:
    """A stage's fitted probes and their held-out metrics (R², linear/nonlinear split)."""

    norm_weight: Tensor  # (d,)
    norm_bias: Tensor  # (1,)
    vector_weight: Tensor  # (d, d): error ≈ x @ vector_weight.T + vector_bias
    vector_bias: Tensor  # (d,)
    prev_weight: Tensor | None = None  # (d + d_prev,) over [x, prev_input_scale · ĥ_prev]
    prev_bias: Tensor | None = None  # (1,)
    from_stage: int | None = None  # the stage whose reconstruction the previous probe reads
    prev_input_scale: float = 1.0
    metrics: dict[str, Any] = field(default_factory=dict)  # JSON-ready: r2s, fvu split, tokens, alphas

    def predict_norm(self, x: Tensor) -> Tensor:
        """relu(x·w + b) for x (N, d): a norm is never negative, and clamping only moves a prediction
        closer to the (non-negative) truth. Returns (N,)."""
        w = self.norm_weight.to(x.device, x.dtype)
        return torch.relu(x @ w + self.norm_bias.to(x.device, x.dtype))

    def predict_vector(self, x: Tensor) -> Tensor:
        """The linear part of the error, x Wᵀ + c: (N, d)."""
        return x @ self.vector_weight.to(x.device, x.dtype).T + self.vector_bias.to(x.device, x.dtype)

    def predict_norm_with_previous(self, x: Tensor, prev_recon: Tensor) -> Tensor:
        """The previous probe on x (N, d) and the previous stage's reconstruction (N, d_prev): (N,)."""
        if self.prev_weight is None or self.prev_bias is None:
            raise ValueError("this stage has no previous-stage predictor (stage 0 has none)")
        inputs = torch.cat([x, prev_recon.to(x.dtype) * self.prev_input_scale], dim=-1)  # (N, d + d_prev)
        return inputs @ self.prev_weight.to(x.device, x.dtype) + self.prev_bias.to(x.device, x.dtype)

    def to(self, device: str | torch.device) -> ErrorPredictor:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return ErrorPredictor(self.norm_weight.to(device), self.norm_bias.to(device), self.vector_weight.to(device),
                              self.vector_bias.to(device), move(self.prev_weight), move(self.prev_bias),
                              self.from_stage, self.prev_input_scale, dict(self.metrics))

    # ------------------------------------------------------------------------------------------ storage

    def tensors(self) -> dict[str, Tensor]:
        """The weights, for a safetensors file; the scalars travel in metadata() (stack.json)."""
        out = {"norm_weight": self.norm_weight, "norm_bias": self.norm_bias, "vector_weight": self.vector_weight,
               "vector_bias": self.vector_bias}
        if self.prev_weight is not None and self.prev_bias is not None:
            out |= {"prev_weight": self.prev_weight, "prev_bias": self.prev_bias}
        return {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}

    def metadata(self) -> dict[str, Any]:
        """JSON-ready scalars for the stage's `error_predictor` record (NaN written as null)."""
        metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in self.metrics.items()}
        return {"target": TARGET, "input": INPUT, "from_stage": self.from_stage,
                "prev_input_scale": self.prev_input_scale, **metrics}

    @staticmethod
    def expected_shapes(d: int, d_prev: int | None) -> dict[str, tuple[int, ...]]:
        """The tensors a predictor file must hold (d_prev: the previous stage's width, None for stage 0)."""
        shapes: dict[str, tuple[int, ...]] = {"norm_weight": (d,), "norm_bias": (1,), "vector_weight": (d, d),
                                              "vector_bias": (d,)}
        if d_prev is not None:
            shapes |= {"prev_weight": (d + d_prev,), "prev_bias": (1,)}
        return shapes

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], metadata: Mapping[str, Any]) -> ErrorPredictor:
        """Inverse of tensors() + metadata()."""
        skip = {"file", "sha256", "bytes", "target", "input", "from_stage", "prev_input_scale"}
        f32 = {k: v.to(torch.float32) for k, v in tensors.items()}
        source = metadata.get("from_stage")
        return cls(f32["norm_weight"], f32["norm_bias"], f32["vector_weight"], f32["vector_bias"],
                   f32.get("prev_weight"), f32.get("prev_bias"), source if isinstance(source, int) else None,
                   float(metadata.get("prev_input_scale", 1.0)),
                   {k: v for k, v in metadata.items() if k not in skip})


class NormProbe(nn.Module):
    """The served norm probe as a module over raw activations, forward(h (M, d), prev (M, d_prev) | None)
    -> relu(x·w + b) (M,) with x computed as the stack runtime does; traced into a stage's ONNX graph."""

    def __init__(self, predictor: ErrorPredictor, input_scale: float, affine: AffineMap | None) -> None:
        super().__init__()
        self.register_buffer("weight", predictor.norm_weight.detach().clone())  # (d,)
        self.register_buffer("bias", predictor.norm_bias.detach().clone())  # (1,)
        self.input_scale = float(input_scale)
        self.affine = affine  # computes in the input's dtype (float64 in the parity check's twin)

    def forward(self, h: Tensor, prev: Tensor | None = None) -> Tensor:
        if self.affine is None:
            x = h * self.input_scale
        else:
            if prev is None:
                raise ValueError("a residual stage's norm probe needs the source stage's activation")
            x = self.affine.residual(prev, h).to(h.dtype)
        return torch.relu(x @ self.weight.to(x.dtype) + self.bias.to(x.dtype))
