"""Evaluate the stages of a stack on held-out text: reconstruction, sparsity, density, CE and KL.

Reconstruction metrics are computed on every real (non-special) held-out token, in the stage's input
space. CE/KL splice metrics replace one stage's hookpoint by its reconstruction (teacher-forced: the
rest of the model is clean), and compare against the clean model and against zero-ablation of that
hookpoint (the floor of "CE loss recovered"). Special-token positions (BOS) are left unspliced: SAEs
are not trained on them, and BOS activations are outliers that would dominate the loss.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from service.config import ModelConfig
from service.engine.hooks import ActivationEdit
from service.engine.host_model import HostModel
from service.engine.loading import load_host_model
from trainer.activations import WindowBatch, batch_windows, iter_windows, special_token_ids
from trainer.corpus import Document, load_corpus, split_documents
from trainer.metrics import NextTokenScorer, ReconstructionAccumulator, ce_loss_recovered
from trainer.sae.base import SparseAutoencoder
from trainer.stack import HostModelIdentity, read_stack, update_metrics


@dataclass(frozen=True)
class EvalStage:
    """What evaluation needs of a stage: where it reads, its SAE, and its input scale."""

    hookpoint: str
    sae: SparseAutoencoder
    input_scale: float


def _batches(host: HostModel, documents: Iterable[Document], context_length: int,
             batch_size: int) -> Iterator[tuple[WindowBatch, Tensor]]:
    """Batches of held-out windows with a mask of the real, non-special positions (B, T)."""
    pad_id = host.tokenizer.pad_token_id if host.tokenizer.pad_token_id is not None else 0
    special = torch.tensor(special_token_ids(host.tokenizer), dtype=torch.int64)
    for batch in batch_windows(iter_windows(host.tokenizer, documents, context_length), batch_size, pad_id):
        yield batch, batch.attention_mask.bool() & ~torch.isin(batch.input_ids, special)


@torch.no_grad()
def reconstruction_metrics(host: HostModel, stages: Sequence[EvalStage], documents: Iterable[Document], *,
                           context_length: int, batch_size: int, max_tokens: int) -> list[dict[str, float]]:
    """Per stage: FVE (pooled and per token), MSE, cosine, L0, shrinkage, dead and dense fractions."""
    accumulators = [ReconstructionAccumulator(s.sae.d_sae) for s in stages]
    names = [s.hookpoint for s in stages]
    seen = 0
    for batch, keep in _batches(host, documents, context_length, batch_size):
        captures = host.forward(batch.input_ids, reads=names, attention_mask=batch.attention_mask).captures
        keep = keep.to(host.device)
        for stage, acc in zip(stages, accumulators, strict=True):
            x = captures[stage.hookpoint][keep].float() * stage.input_scale  # (n, d)
            z = stage.sae.encode(x)
            acc.update(x, stage.sae.decode(z), z)
        seen += int(keep.sum())
        if seen >= max_tokens:
            break
    return [acc.result() for acc in accumulators]


def _masked_edit(stage: EvalStage, keep: Tensor, replace: str) -> ActivationEdit:
    """Replace the activation at real positions by the stage's reconstruction, or by zero."""

    def edit(x: Tensor) -> Tensor:  # x: (B, T, d); keep: (B, T)
        new = x.clone()
        if replace == "zero":
            new[keep] = 0
        else:
            scaled = x[keep].float() * stage.input_scale  # (n, d)
            new[keep] = (stage.sae.decode(stage.sae.encode(scaled)) / stage.input_scale).to(x.dtype)
        return new

    return edit


@torch.no_grad()
def splice_metrics(host: HostModel, stages: Sequence[EvalStage], documents: Iterable[Document], *,
                   context_length: int, num_windows: int, batch_size: int = 4) -> list[dict[str, float]]:
    """Per stage, teacher-forced: CE clean / spliced / zero-ablated, ΔCE, CE loss recovered, KL."""
    sums = [{"ce_spliced": 0.0, "ce_zero": 0.0, "kl": 0.0, "kl_zero": 0.0} for _ in stages]
    ce_clean = 0.0
    positions = 0
    batches = islice(_batches(host, documents, context_length, batch_size), max(1, num_windows // batch_size))
    for batch, keep in batches:
        ids, mask = batch.input_ids.to(host.device), batch.attention_mask.to(host.device)
        keep = keep.to(host.device)
        target_mask = mask * keep  # score only predictions of real tokens
        scorer = NextTokenScorer(host.forward(ids, attention_mask=mask, logits=True).logits, ids, target_mask)
        ce_clean += float(scorer.clean_ce().sum())
        positions += scorer.positions
        for stage, acc in zip(stages, sums, strict=True):
            for kind, ce_key, kl_key in (("sae", "ce_spliced", "kl"), ("zero", "ce_zero", "kl_zero")):
                writes = {stage.hookpoint: _masked_edit(stage, keep, kind)}
                ce, kl = scorer.score(host.forward(ids, attention_mask=mask, writes=writes, logits=True).logits)
                acc[ce_key] += float(ce.sum())
                acc[kl_key] += float(kl.sum())
    if positions == 0:
        raise ValueError("no held-out positions to score; give the evaluation more text")
    results = []
    clean_mean = ce_clean / positions
    for acc in sums:
        spliced, zero = acc["ce_spliced"] / positions, acc["ce_zero"] / positions
        results.append({
            "ce_clean": clean_mean, "ce_spliced": spliced, "ce_zero_ablation": zero,
            "delta_ce": spliced - clean_mean, "ce_loss_recovered": ce_loss_recovered(clean_mean, spliced, zero),
            "kl": acc["kl"] / positions, "kl_zero_ablation": acc["kl_zero"] / positions,
            "ce_positions": positions,
        })
    return results


def evaluate_stages(host: HostModel, stages: Sequence[EvalStage], documents: Sequence[Document], *,
                    context_length: int, batch_size: int, max_tokens: int, ce_windows: int) -> list[dict[str, float]]:
    """Reconstruction and splice metrics per stage, merged into one dict each."""
    recon = reconstruction_metrics(host, stages, documents, context_length=context_length,
                                   batch_size=batch_size, max_tokens=max_tokens)
    splice = splice_metrics(host, stages, documents, context_length=context_length, num_windows=ce_windows)
    return [{**r, **s} for r, s in zip(recon, splice, strict=True)]


def evaluate_stack_dir(stack_dir: str | Path, *, model: str | None = None, corpus: str | None = None,
                       max_tokens: int = 8192, ce_windows: int = 16,
                       report_path: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a stack on the eval split of its training corpus (or `corpus`) and record the metrics in
    its stack.json. The host model defaults to the one the stack names and must match its identity."""
    peek = read_stack(stack_dir)
    host = load_host_model(ModelConfig.from_env(os.environ, name=model or peek.identity.name))
    stack = read_stack(stack_dir, expect_model=HostModelIdentity.from_model(host.model, host.name),
                       device=host.device)
    config = stack.stages[0].training.get("config", {})
    corpus_cfg, activations = config.get("corpus", {}), config.get("activations", {})
    spec = corpus or corpus_cfg.get("spec", "default")
    documents = load_corpus(spec, text_field=corpus_cfg.get("text_field", "text"))
    splits = split_documents(documents, calibration_fraction=corpus_cfg.get("calibration_fraction", 0.05),
                             eval_fraction=corpus_cfg.get("eval_fraction", 0.05), seed=corpus_cfg.get("split_seed", 0))
    stages = [EvalStage(s.hookpoint, s.sae, s.input_scale) for s in stack.stages]
    metrics = evaluate_stages(host, stages, splits.eval, context_length=activations.get("context_length", 128),
                              batch_size=activations.get("batch_size", 8), max_tokens=max_tokens,
                              ce_windows=ce_windows)
    for index, stage_metrics in enumerate(metrics):
        update_metrics(stack_dir, index, stage_metrics)
    report = {"stack": str(stack_dir), "model": host.name, "corpus": spec,
              "stages": [{"hookpoint": s.hookpoint, "eval": m} for s, m in zip(stack.stages, metrics, strict=True)]}
    if report_path is not None:
        Path(report_path).write_text(json.dumps(report, indent=2))
    return report
