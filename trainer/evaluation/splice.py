"""Splice evaluation: replace hookpoints by a stack's reconstructions and measure the next-token loss.

Per stage (single splice, teacher-forced): only that stage's hookpoint is replaced; a residual stage's
predictor reads the clean activation of its source. Whole stack (multi-layer splice):
- teacher-forced: every stage's reconstruction is computed from the clean pass, then all selected
  hookpoints are replaced at once;
- online: layer by layer in one forward pass; each stage encodes what flows after the earlier stages
  were replaced, so errors compound (a residual stage's predictor reads the earlier reconstruction).
Both are compared with the clean model (ΔCE, KL) and with zero-ablation of the same hookpoints (CE loss
recovered). Special-token positions (BOS) are never replaced: SAEs are not trained on them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import islice

import torch
from torch import Tensor

from core.host.host_model import HostModel
from core.stack.runtime import RuntimeStage, StackRuntime
from trainer.data.activations import WindowBatch
from trainer.evaluation.metrics import NextTokenScorer, ce_loss_recovered

Edit = Callable[[Tensor], Tensor]


def _put(h: Tensor, keep: Tensor, values: Tensor) -> Tensor:
    """h with its kept positions replaced: h (B, T, d), keep (B, T), values (B, T, d) or (n, d)."""
    new = h.clone()
    new[keep] = (values[keep] if values.shape[:-1] == keep.shape else values).to(h.dtype)
    return new


def _reconstructing_handler(runtime: StackRuntime, keep: Tensor) -> Callable[[RuntimeStage, Tensor, Tensor | None],
                                                                              Tensor]:
    """A StackPass handler that replaces kept positions by the stage's reconstruction of what arrives."""

    def handler(stage: RuntimeStage, h: Tensor, prev: Tensor | None) -> Tensor:
        recon = runtime.run_stage(stage, h, prev).recon.reshape(h.shape)  # (B, T, d)
        return _put(h, keep, recon)

    return handler


class _Variants:
    """Sums of CE and KL over scored positions for named forward-pass variants."""

    def __init__(self) -> None:
        self.ce: dict[str, float] = {}
        self.kl: dict[str, float] = {}

    def add(self, name: str, scorer: NextTokenScorer, logits: Tensor) -> None:
        ce, kl = scorer.score(logits)
        self.ce[name] = self.ce.get(name, 0.0) + float(ce.sum())
        self.kl[name] = self.kl.get(name, 0.0) + float(kl.sum())


@torch.no_grad()
def splice_metrics(host: HostModel, runtime: StackRuntime, batches: Iterable[tuple[WindowBatch, Tensor]], *,
                   num_batches: int, multi_layer: bool = True) -> tuple[list[dict[str, float]], dict[str, float]]:
    """(per-stage single-splice metrics, whole-stack multi-layer metrics; empty for one stage)."""
    variants, ce_clean, positions = _Variants(), 0.0, 0
    stages = runtime.stages
    multi_layer = multi_layer and len(stages) > 1
    for batch, keep in islice(batches, max(1, num_batches)):
        ids, mask = batch.input_ids.to(host.device), batch.attention_mask.to(host.device)
        keep = keep.to(host.device)
        clean = host.forward(ids, attention_mask=mask, reads=runtime.hookpoints, logits=True)
        scorer = NextTokenScorer(clean.logits, ids, mask * keep)  # score only predictions of real tokens
        ce_clean += float(scorer.clean_ce().sum())
        positions += scorer.positions

        def run(writes: dict[str, Edit], name: str) -> None:
            logits = host.forward(ids, attention_mask=mask, writes=writes, logits=True).logits  # noqa: B023
            variants.add(name, scorer, logits)  # noqa: B023

        def zero(h: Tensor) -> Tensor:
            return _put(h, keep, torch.zeros_like(h))  # noqa: B023

        teacher = runtime.decompose(clean.captures)
        tf_writes = _teacher_forced_writes(runtime, teacher, clean.captures, keep)
        for stage in stages:
            run({stage.hookpoint: tf_writes[stage.hookpoint]}, f"sae{stage.index}")
            run({stage.hookpoint: zero}, f"zero{stage.index}")
        if multi_layer:
            run({hp: zero for hp in runtime.hookpoints}, "all_zero")
            run(tf_writes, "all_teacher_forced")
            run(runtime.new_pass(_reconstructing_handler(runtime, keep)).writes(), "all_online")
    if positions == 0:
        raise ValueError("no held-out positions to score; give the evaluation more text")
    clean_mean = ce_clean / positions

    def summary(name: str, zero_name: str, prefix: str = "") -> dict[str, float]:
        ce, ce_zero = variants.ce[name] / positions, variants.ce[zero_name] / positions
        return {f"{prefix}ce_spliced": ce, f"{prefix}delta_ce": ce - clean_mean,
                f"{prefix}kl": variants.kl[name] / positions,
                f"{prefix}ce_loss_recovered": ce_loss_recovered(clean_mean, ce, ce_zero)}

    per_stage = [{"ce_clean": clean_mean, "ce_positions": positions, **summary(f"sae{s.index}", f"zero{s.index}"),
                  "ce_zero_ablation": variants.ce[f"zero{s.index}"] / positions,
                  "kl_zero_ablation": variants.kl[f"zero{s.index}"] / positions} for s in stages]
    stack: dict[str, float] = {}
    if multi_layer:
        stack = {"ce_clean": clean_mean, "ce_positions": positions,
                 "multi_ce_zero_ablation": variants.ce["all_zero"] / positions,
                 **summary("all_teacher_forced", "all_zero", "multi_tf_"),
                 **summary("all_online", "all_zero", "multi_online_")}
    return per_stage, stack


def _teacher_forced_writes(runtime: StackRuntime, teacher: dict, captures: dict[str, Tensor],
                           keep: Tensor) -> dict[str, Edit]:
    """Replace each hookpoint by its stage's reconstruction computed from the clean pass (the last stage
    at a hookpoint wins when several share it)."""
    recons = {s.hookpoint: teacher[s.index].recon.reshape(captures[s.hookpoint].shape) for s in runtime.stages}
    return {hp: (lambda h, r=r: _put(h, keep, r)) for hp, r in recons.items()}

