"""Evaluate a stack on held-out text: reconstruction, sparsity, density, single- and multi-layer splice
CE/KL (trainer/evaluation/splice.py), cross-layer decoder redundancy and, optionally, sparse probing.

Reconstruction metrics are computed on every real (non-special) held-out token in activation space
(h against the stack's reconstruction ĥ, through the affine chain for residual stages), and for residual
(ReSAE) stages also on the residual target the SAE encodes (`residual_*` keys). Everything goes through
the stack runtime, the same code the service runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.host.host_model import HostModel
from core.stack.runtime import StackRuntime
from core.stack.writer import update_metrics
from trainer.data.activations import WindowBatch, batch_windows, iter_windows, special_token_ids
from trainer.data.corpus import Document
from trainer.evaluation.held_out import open_held_out
from trainer.evaluation.metrics import ReconstructionAccumulator
from trainer.evaluation.probe_tasks import ProbeTask, build_probe_tasks
from trainer.evaluation.probing import run_probing
from trainer.evaluation.redundancy import decoder_redundancy
from trainer.evaluation.splice import splice_metrics


def _batches(host: HostModel, documents: Iterable[Document], context_length: int,
             batch_size: int) -> Iterator[tuple[WindowBatch, Tensor]]:
    """Batches of held-out windows with a mask of the real, non-special positions (B, T)."""
    pad_id = host.tokenizer.pad_token_id if host.tokenizer.pad_token_id is not None else 0
    special = torch.tensor(special_token_ids(host.tokenizer), dtype=torch.int64)
    for batch in batch_windows(iter_windows(host.tokenizer, documents, context_length), batch_size, pad_id):
        yield batch, batch.attention_mask.bool() & ~torch.isin(batch.input_ids, special)


@torch.no_grad()
def reconstruction_metrics(host: HostModel, runtime: StackRuntime, documents: Iterable[Document], *,
                           context_length: int, batch_size: int, max_tokens: int) -> list[dict[str, float]]:
    """Per stage: FVE (pooled and per token), MSE, cosine, L0, shrinkage, dead and dense fractions in
    activation space; for residual stages also on the residual target and the predictor's own FVE."""
    stages = runtime.stages
    activation = [ReconstructionAccumulator(s.sae.d_sae) for s in stages]
    residual = {s.index: ReconstructionAccumulator(s.sae.d_sae) for s in stages if s.is_residual}
    predictor = {i: ReconstructionAccumulator(1) for i in residual}
    seen = 0
    for batch, keep in _batches(host, documents, context_length, batch_size):
        captures = host.forward(batch.input_ids, reads=runtime.hookpoints, attention_mask=batch.attention_mask).captures
        keep = keep.to(host.device)
        kept = {hp: captures[hp][keep] for hp in runtime.hookpoints}  # (n, d)
        for i, result in runtime.decompose(kept).items():
            h = kept[stages[i].hookpoint]
            activation[i].update(h, result.recon, result.codes)
            if i in residual:
                residual[i].update(result.sae_input, result.sae_recon, result.codes)
                prediction = result.recon - result.sae_recon / stages[i].input_scale  # A h_prev + c
                predictor[i].update(h, prediction, torch.zeros(h.shape[0], 1))
        seen += int(keep.sum())
        if seen >= max_tokens:
            break
    results = [acc.result() for acc in activation]
    for i, acc in residual.items():
        results[i] |= {f"residual_{k}": v for k, v in acc.result().items() if k in RESIDUAL_KEYS}
        results[i]["affine_fve"] = predictor[i].result()["fve"]
    return results


RESIDUAL_KEYS = ("fve", "fve_per_token", "mse", "cosine")


def redundancy_metrics(runtime: StackRuntime) -> list[dict[str, float]]:
    """Per stage after the first: decoder redundancy against the previous stage, raw and (when the stage is
    residual on it) with the previous atoms mapped through A."""
    results: list[dict[str, float]] = [{}]
    for prev, stage in zip(runtime.stages[:-1], runtime.stages[1:], strict=True):
        mapped = stage.affine.A if stage.affine is not None and stage.residual_of == prev.index else None
        if prev.sae.d_in != stage.sae.d_in and mapped is None:
            results.append({})
            continue
        results.append(decoder_redundancy(prev.sae.W_dec, stage.sae.W_dec, mapped))
    return results


def probing_metrics(host: HostModel, runtime: StackRuntime, *, context_length: int, batch_size: int,
                    tasks: Sequence[ProbeTask] | None = None) -> list[dict[str, float]]:
    """The offline sparse-probing suite (or `tasks`) on each stage's mean-pooled codes."""

    def encode(texts: list[str]) -> list[Tensor]:
        return mean_pooled_codes(host, runtime, texts, context_length=context_length, batch_size=batch_size)

    return run_probing(encode, build_probe_tasks() if tasks is None else tasks)


@torch.no_grad()
def mean_pooled_codes(host: HostModel, runtime: StackRuntime, texts: Sequence[str], *, context_length: int,
                      batch_size: int) -> list[Tensor]:
    """Per stage, (len(texts), d_sae): codes averaged over each text's real (non-special) tokens."""
    special = torch.tensor(special_token_ids(host.tokenizer), dtype=torch.int64)
    pooled: list[list[Tensor]] = [[] for _ in runtime.stages]
    for start in range(0, len(texts), batch_size):
        enc = host.tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                             truncation=True, max_length=context_length)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        keep = (mask.bool() & ~torch.isin(ids, special)).to(host.device)  # (B, T)
        captures = host.forward(ids, reads=runtime.hookpoints, attention_mask=mask).captures
        weights = keep.float() / keep.sum(dim=1, keepdim=True).clamp_min(1)  # (B, T)
        for i, result in runtime.decompose(captures).items():
            codes = result.codes.reshape(*keep.shape, -1)  # (B, T, d_sae)
            pooled[i].append(torch.einsum("bt,bth->bh", weights, codes.float()).cpu())
    return [torch.cat(p) for p in pooled]


def evaluate_runtime(host: HostModel, runtime: StackRuntime, documents: Sequence[Document], *, context_length: int,
                     batch_size: int, max_tokens: int, ce_windows: int,
                     probing: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(per-stage metrics, stack-level metrics such as the multi-layer splice)."""
    recon = reconstruction_metrics(host, runtime, documents, context_length=context_length,
                                   batch_size=batch_size, max_tokens=max_tokens)
    splice_batch = 4
    per_stage, stack = splice_metrics(host, runtime, _batches(host, documents, context_length, splice_batch),
                                      num_batches=max(1, ce_windows // splice_batch))
    metrics = [{**r, **s, **d} for r, s, d in zip(recon, per_stage, redundancy_metrics(runtime), strict=True)]
    if probing:
        for m, p in zip(metrics, probing_metrics(host, runtime, context_length=context_length,
                                                 batch_size=batch_size), strict=True):
            m.update(p)
    return metrics, stack


def evaluate_stack_dir(stack_dir: str | Path, *, model: str | None = None, corpus: str | None = None,
                       max_tokens: int = 8192, ce_windows: int = 16, probing: bool = False,
                       report_path: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a stack on the eval split of its training corpus (or `corpus`) and record the metrics in
    its stack.json. The host model defaults to the one the stack names and must match its identity."""
    held = open_held_out(stack_dir, model=model, corpus=corpus)
    host, stack, spec = held.host, held.stack, held.corpus
    metrics, stack_metrics = evaluate_runtime(
        host, StackRuntime.from_loaded(stack), held.documents, context_length=held.context_length,
        batch_size=held.batch_size, max_tokens=max_tokens, ce_windows=ce_windows, probing=probing)
    for index, stage_metrics in enumerate(metrics):
        update_metrics(stack_dir, index, stage_metrics)
    if stack_metrics:
        update_metrics(stack_dir, None, stack_metrics)
    report = {"stack": str(stack_dir), "name": stack.name, "model": host.name, "corpus": spec,
              "metrics": stack_metrics,
              "stages": [{"name": s.name, "hookpoint": s.hookpoint, "architecture": s.sae.cfg.architecture,
                          "d_sae": s.sae.d_sae, "residual_of": s.residual_of, "eval": m}
                         for s, m in zip(stack.stages, metrics, strict=True)]}
    if report_path is not None:
        Path(report_path).write_text(json.dumps(report, indent=2))
    return report
