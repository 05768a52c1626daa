"""Turn a stage's codes for N tokens into per-token StageCodes: top-k by |value| on the device, the
requested always-reported features appended, and one device-to-host copy for the whole block."""

from __future__ import annotations

import torch
from torch import Tensor

from core.sae.base import l0, top_k_by_magnitude
from service.engine.contract.specs import StageCodes


def stage_codes(stage: int, z: Tensor, top_k: int, *, always: tuple[int, ...] = (),
                error_norm: Tensor | None = None, predicted: Tensor | None = None) -> list[StageCodes]:
    """z (N, d_sae) → N StageCodes. Features with value 0 are dropped from the top-k (a token with L0 = 3
    reports 3 features even when top_k is 10); features in `always` are reported whatever their value."""
    values, ids = top_k_by_magnitude(z, top_k)  # (N, k)
    counts = l0(z)  # (N,)
    extra_ids = torch.tensor(always, dtype=torch.int64, device=z.device)
    extra_values = z[:, extra_ids] if always else None  # (N, len(always))
    host = [t.detach().float().cpu() if t.is_floating_point() else t.detach().cpu()
            for t in (values, ids, counts, *(x for x in (extra_values, error_norm, predicted) if x is not None))]
    values_h, ids_h, counts_h = host[:3]
    rest = iter(host[3:])
    extra_h = next(rest) if extra_values is not None else None
    error_h = next(rest) if error_norm is not None else None
    predicted_h = next(rest) if predicted is not None else None
    out = []
    for row in range(z.shape[0]):
        keep = values_h[row] != 0
        row_ids = ids_h[row][keep].tolist()
        row_values = values_h[row][keep].tolist()
        if extra_h is not None:
            for fid, value in zip(always, extra_h[row].tolist(), strict=True):
                if fid not in row_ids:
                    row_ids.append(fid)
                    row_values.append(value)
        out.append(StageCodes(
            stage=stage, ids=tuple(row_ids), values=tuple(row_values), l0=int(counts_h[row]),
            error_norm=None if error_h is None else float(error_h[row]),
            predicted_error_norm=None if predicted_h is None else float(predicted_h[row]),
        ))
    return out
