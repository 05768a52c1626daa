"""EncodeActivations in the full mode: captured activations through the torch stack runtime.

The same runtime as Decompose (core.stack.runtime: input scale or ReSAE residual, encode, decode for the
error norm), so a batch of activations that Decompose would see gives the codes Decompose reports. Runs on
the engine's worker thread like every other piece of model work. Top-k runs on the device; one copy to
the host per batch, then the rows are built with numpy by `codes_rows`, as on the ONNX Runtime path (per-row
torch indexing costs more than the encode itself at small widths).
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.sae.base import l0, top_k_by_magnitude
from service.engine.contract.encode_spec import EncodeSpec, EncodeTarget, codes_rows
from service.engine.contract.specs import StageCodes
from service.engine.stacks.served import ServedStack, predicted_error_norm


def encode_targets(stack: ServedStack) -> list[EncodeTarget]:
    """What request validation needs of each stage."""
    return [EncodeTarget(s.index, s.name, s.sae.d_in, s.sae.d_sae, s.residual_of) for s in stack.loaded.stages]


def _host(x: Tensor | None):
    return None if x is None else x.detach().to("cpu", torch.float32 if x.is_floating_point() else x.dtype).numpy()


def encode_batch(stack: ServedStack, spec: EncodeSpec) -> list[StageCodes]:
    """spec.activations (N, d_in) [and spec.previous (N, d_prev)] -> N StageCodes of stage spec.stage."""
    runtime = stack.runtime
    stage = runtime.stages[spec.stage]
    device = stage.sae.W_dec.device
    h = torch.from_numpy(spec.activations).to(device)  # (N, d_in) float32
    prev = torch.from_numpy(spec.previous).to(device) if spec.previous is not None else None  # (N, d_prev)
    error = predicted = None
    if spec.include_error:
        result = runtime.run_stage(stage, h, prev)
        z, error, predicted = result.codes, result.error_norm(), predicted_error_norm(stack, stage, h, prev)
    else:
        z = runtime.encode(stage, h, prev)  # (N, d_sae)
    values, ids = top_k_by_magnitude(z, spec.top_k)  # (N, k) on the device
    return codes_rows(spec.stage, _host(values), _host(ids), _host(l0(z)), _host(error), _host(predicted))
