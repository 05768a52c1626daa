"""All error-norm metrics of a stack on held-out activations in one pass (for `eval` and the research
report): probes fitted afresh (norm, vector, previous-stage), the linear/nonlinear split, the stored
predictor's out-of-sample R², and what ITO removes of the total and the nonlinear error.

Definitions: trainer/training/error_predictors.py (probes, FVU split) and trainer/evaluation/ito.py (gradient pursuit).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.stack.manifest import load_manifest
from core.stack.runtime import StackRuntime
from trainer.evaluation.ito import ItoAccumulator, update_ito
from trainer.training.error_predictors import accumulate, fit_predictor, stage_moments


class _StoredR2:
    """R² of a stored norm probe on every row it is shown (pooled, float64)."""

    def __init__(self) -> None:
        self.n, self.sum_y, self.sum_yy, self.sse = 0, 0.0, 0.0, 0.0

    def update(self, actual: Tensor, predicted: Tensor) -> None:
        actual, predicted = actual.double(), predicted.double()  # (N,)
        self.n += actual.shape[0]
        self.sum_y += float(actual.sum())
        self.sum_yy += float(actual.pow(2).sum())
        self.sse += float((actual - predicted).pow(2).sum())

    def result(self) -> float:
        sst = self.sum_yy - self.sum_y**2 / self.n if self.n else 0.0
        return 1.0 - self.sse / sst if sst > 0 else math.nan


@torch.no_grad()
def error_norm_metrics(runtime: StackRuntime, held_out_batches: Iterable[Mapping[str, Tensor]], *,
                       ito: bool = True, max_tokens: int | None = None) -> dict[str, Any]:
    """Every error-norm metric of every stage, from held-out batches {hookpoint: (B, d)} of raw activations
    (teacher-forced; the batches must not be SAE training tokens). Stops after `max_tokens` rows.

    Returns {"tokens": rows used, "stages": [per stage: index, name, hookpoint, architecture, d_sae, l0,
    norm_r2, vector_r2, vector_r2_per_dim, fvu_total, fvu_linear, fvu_nonlinear, nonlinear_share,
    prev_r2 and prev_gain (stages > 0), alpha_*, tokens_fit/select/test, stored_norm_r2 (None without a
    stored predictor), and with `ito`: ito_l0, ito_encoder_l0, ito_improved_fraction, ito_fvu_total,
    ito_fvu_nonlinear, ito_encoder_fvu_total, ito_encoder_fvu_nonlinear, ito_total_error_reduction,
    ito_nonlinear_error_reduction]}. R² and FVU values are on the test rows (every fifth row).
    """
    moments = stage_moments(runtime)
    stored = {s.index: _StoredR2() for s in runtime.stages if s.error_predictor is not None}
    itos = [ItoAccumulator(s.sae.d_in) for s in runtime.stages] if ito else []
    l0_sum = [0.0] * len(runtime.stages)
    for batch in held_out_batches:
        results = accumulate(runtime, batch, moments)
        for i, result in results.items():
            l0_sum[i] += float((result.codes != 0).sum())
            if i in stored and result.predicted_error_norm is not None:
                stored[i].update(result.error_norm(), result.predicted_error_norm)
        if ito:
            update_ito(runtime, batch, results, itos)
        if max_tokens is not None and moments[0].rows >= max_tokens:
            break
    rows = moments[0].rows
    stages = []
    for stage, m in zip(runtime.stages, moments, strict=True):
        predictor = fit_predictor(m, stage.index - 1 if stage.index > 0 else None)
        entry: dict[str, Any] = {"index": stage.index, "name": stage.name, "hookpoint": stage.hookpoint,
                                 "architecture": stage.sae.cfg.architecture, "d_sae": stage.sae.d_sae,
                                 "l0": l0_sum[stage.index] / max(rows, 1), **predictor.metrics,
                                 "stored_norm_r2": stored[stage.index].result() if stage.index in stored else None}
        if ito:
            entry |= itos[stage.index].result()
        stages.append(entry)
    return {"tokens": rows, "stages": stages}


PREDICTOR_COLUMNS = ("norm_r2", "vector_r2", "nonlinear_share", "prev_r2", "prev_gain")


def format_error_predictors(names: Sequence[str], records: Sequence[Mapping[str, Any] | None]) -> str:
    """A table of the stored predictors' held-out numbers (stack.json `error_predictor` records); empty
    when no stage has one."""
    if not any(records):
        return ""
    width = max(len(n) for n in names)
    lines = [f"{'error predictor':<{width}}" + "".join(f"{c:>17}" for c in PREDICTOR_COLUMNS)]
    for name, record in zip(names, records, strict=True):
        cells = [(record or {}).get(c) for c in PREDICTOR_COLUMNS]
        lines.append(f"{name:<{width}}" + "".join(f"{'-':>17}" if v is None else f"{v:>17.4f}" for v in cells))
    return "\n".join(lines)


def stored_predictor_table(stack_dir: str | Path) -> str:
    """format_error_predictors for the stack at `stack_dir`, from its manifest."""
    stages = load_manifest(Path(stack_dir))[0]["stages"]
    return format_error_predictors([str(s.get("name")) for s in stages], [s.get("error_predictor") for s in stages])
