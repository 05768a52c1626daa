"""The frozen affine predictor of a ReSAE stage: h_{m+1} ≈ A h_m + c, and the residual scale s.

A residual stage trains on r = s·(h_{m+1} − A h_m − c) and maps back with ĥ_{m+1} = A h_m + c + r̂ / s.
This module holds only the fitted map (torch-only, so the service can import it with the stack format);
fitting lives in trainer/training/affine_fit.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class AffineMap:
    """A frozen affine predictor y ≈ A x + c with the residual scale s that gives E‖s·r‖² = d_out."""

    A: Tensor  # (d_out, d_in) float32
    c: Tensor  # (d_out,) float32
    alpha: float  # chosen scale-free ridge strength
    r2_held_out: float
    residual_scale: float  # s = 1 / RMS of the held-out residual, RMS² = SSE / (n · d_out)
    r2_by_alpha: dict[float, float] = field(default_factory=dict)

    def _prep(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        dtype = torch.promote_types(x.dtype, torch.float32)
        return x.to(dtype), self.A.to(x.device, dtype), self.c.to(x.device, dtype)

    def predict(self, x: Tensor) -> Tensor:
        x, a, c = self._prep(x)  # x (N, d_in)
        return x @ a.T + c  # (N, d_out)

    def residual(self, x: Tensor, y: Tensor) -> Tensor:
        """The ReSAE input s·(y − A x − c), (N, d_out)."""
        pred = self.predict(x)
        return self.residual_scale * (y.to(pred.dtype) - pred)

    def reconstruct(self, x: Tensor, r_hat: Tensor) -> Tensor:
        """Map a residual-space reconstruction back to activation space: A x + c + r̂ / s, (N, d_out)."""
        pred = self.predict(x)
        return pred + r_hat.to(pred.dtype) / self.residual_scale

    def tensors(self) -> dict[str, Tensor]:
        """The matrices, for a safetensors file; the scalars travel in metadata() (stack.json)."""
        return {"A": self.A.contiguous(), "c": self.c.contiguous()}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], metadata: Mapping[str, Any]) -> AffineMap:
        """Inverse of tensors() + metadata()."""
        by_alpha = {float(k): float(v) for k, v in metadata.get("r2_by_alpha", {}).items()}
        return cls(
            A=tensors["A"].to(torch.float32),
            c=tensors["c"].to(torch.float32),
            alpha=float(metadata["alpha"]),
            r2_held_out=float(metadata["r2_held_out"]),
            residual_scale=float(metadata["residual_scale"]),
            r2_by_alpha=by_alpha,
        )

    def metadata(self) -> dict[str, Any]:
        """JSON-ready scalars for stack.json (alpha keys as strings, since JSON keys must be)."""
        return {
            "alpha": self.alpha,
            "r2_held_out": self.r2_held_out,
            "residual_scale": self.residual_scale,
            "r2_by_alpha": {repr(a): r for a, r in self.r2_by_alpha.items()},
        }
