"""A small trained stack for the tiny Gemma host, shared by the engine read-path tests.

Four stages in forward order, covering what the engine must handle:
    0 resid1  blocks.1.hook_resid_post  TopK
    1 signed  blocks.2.hook_attn_out    SA-GSAE (signed codes)
    2 mlp2    blocks.2.hook_mlp_out     TopK
    3 resid3  blocks.3.hook_resid_post  TopK on the residual of stage 0 (ReSAE: A h1 + c)
SAEs are fitted in memory on activations of pydoc topic pages (not the self-check's calibration pages)
and the metrics are recorded the trainer's way (trainer.evaluation.evaluate on held-out pages), so the stack
passes the service's self-check honestly. Training runs once per process (a few seconds); every test
module writes its own copy.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import torch

from core.host.host_model import HostModel
from core.sae import SAEConfig, build_sae
from core.sae.base import SparseAutoencoder
from core.stack.affine import AffineMap
from core.stack.identity import HostModelIdentity
from core.stack.runtime import RuntimeStage, StackRuntime
from core.stack.writer import StageSpec, write_stack
from service.engine.stacks.served import CALIBRATION_TOPICS
from trainer.data.corpus import Document
from trainer.evaluation.evaluate import reconstruction_metrics
from trainer.training.affine_fit import MomentAccumulator, fit_affine
from trainer.training.optimization import fit_in_memory

CONTEXT = 64
STAGES = (  # (name, hookpoint, architecture, d_sae)
    ("resid1", "blocks.1.hook_resid_post", "topk", 256),
    ("signed", "blocks.2.hook_attn_out", "sa_gsae", 128),
    ("mlp2", "blocks.2.hook_mlp_out", "topk", 256),
    ("resid3", "blocks.3.hook_resid_post", "topk", 256),
)
RESIDUAL = {3: 0}  # stage -> the stage whose activation its affine predictor reads
HOOKPOINTS = tuple(dict.fromkeys(hp for _, hp, _, _ in STAGES))


def _pages() -> tuple[list[str], list[str]]:
    """(training pages, held-out pages), none of them a calibration page."""
    names = [n for n in sorted(topics) if n not in CALIBRATION_TOPICS]
    return [topics[n] for n in names[:-12]], [topics[n] for n in names[-12:]]


def capture(host: HostModel, pages: list[str], windows_per_page: int = 2) -> dict[str, torch.Tensor]:
    """hookpoint -> (N, d): the real tokens of full windows (BOS + CONTEXT - 1 tokens) from each page's
    start, all in one forward pass."""
    tok = host.tokenizer
    span = CONTEXT - 1
    rows = []
    for page in pages:
        ids = tok(page, add_special_tokens=False)["input_ids"]
        rows += [[tok.bos_token_id, *ids[i * span : (i + 1) * span]] for i in range(windows_per_page)
                 if len(ids) >= (i + 1) * span]
    captures = host.forward(torch.tensor(rows), reads=HOOKPOINTS).captures
    return {hp: captures[hp][:, 1:].reshape(-1, captures[hp].shape[-1]) for hp in HOOKPOINTS}


def _fit(architecture: str, d_sae: int, x: torch.Tensor, seed: int) -> SparseAutoencoder:
    torch.manual_seed(seed)
    if architecture == "topk":
        sae = build_sae(SAEConfig(architecture, x.shape[1], d_sae, k=8))
        fit_in_memory(sae, x, steps=150, batch_size=128, lr=1e-2, seed=seed)
    else:  # sa_gsae: a strong sparsity penalty for a short run gives L0 ≈ 20 of 128, FVE ≈ 0.9
        sae = build_sae(SAEConfig(architecture, x.shape[1], d_sae, sparsity_coefficient=2.0))
        fit_in_memory(sae, x, steps=80, batch_size=128, lr=1e-2, seed=seed)
    return sae.requires_grad_(False).eval()


def _affine(h_prev: torch.Tensor, h: torch.Tensor) -> AffineMap:
    fit, held = MomentAccumulator(h_prev.shape[1], h.shape[1]), MomentAccumulator(h_prev.shape[1], h.shape[1])
    fit.update(h_prev[::2], h[::2])
    held.update(h_prev[1::2], h[1::2])
    return fit_affine(fit, held)


@dataclass(frozen=True)
class TrainedStack:
    runtime: StackRuntime
    metrics: list[dict[str, float]]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Small matmuls on one thread: with other processes on the cores, two torch threads spin-wait on
    each other and the fit takes a minute instead of two seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.cache
def trained(host: HostModel) -> TrainedStack:
    """Fit every stage once per process and host; metrics evaluated on held-out pages."""
    with one_thread():
        return _train(host)


def _train(host: HostModel) -> TrainedStack:
    train_pages, held_pages = _pages()
    acts = capture(host, train_pages)
    stages: list[RuntimeStage] = []
    for index, (name, hp, architecture, d_sae) in enumerate(STAGES):
        h = acts[hp]  # (N, d)
        source = RESIDUAL.get(index)
        if source is None:
            scale = float((h.shape[1] / h.pow(2).sum(-1).mean()) ** 0.5)
            stages.append(RuntimeStage(index, name, hp, _fit(architecture, d_sae, h * scale, index), scale))
            continue
        affine = _affine(acts[STAGES[source][1]], h)
        x = affine.residual(acts[STAGES[source][1]], h)
        sae = _fit(architecture, d_sae, x, index)
        stages.append(RuntimeStage(index, name, hp, sae, affine.residual_scale, source, affine))
    runtime = StackRuntime(stages)
    docs = [Document(f"held:{i}", page, "pydoc") for i, page in enumerate(held_pages)]
    metrics = reconstruction_metrics(host, runtime, docs, context_length=CONTEXT, batch_size=8, max_tokens=1024)
    return TrainedStack(runtime, metrics)


def write_tiny_stack(host: HostModel, out_dir: Path, *, record_metrics: bool = True,
                     extras: dict[int, dict[str, Any]] | None = None,
                     extra_tensors: dict[int, dict[str, torch.Tensor]] | None = None,
                     meta_saes: dict[int, SparseAutoencoder] | None = None, name: str = "tiny") -> Path:
    """Write the trained stack to `out_dir` (optionally without metrics, or with per-stage extras or meta-SAEs)."""
    fitted = trained(host)
    training = {"config": {"activations": {"context_length": CONTEXT}}}
    specs = [
        StageSpec(s.sae, s.hookpoint, s.input_scale, name=s.name, training=training,
                  metrics=dict(m) if record_metrics else {}, extras=(extras or {}).get(s.index, {}),
                  extra_tensors=(extra_tensors or {}).get(s.index), residual_of=s.residual_of, affine=s.affine,
                  meta_sae=(meta_saes or {}).get(s.index))
        for s, m in zip(fitted.runtime.stages, fitted.metrics, strict=True)
    ]
    identity = HostModelIdentity.from_model(host.model, host.name)
    return write_stack(out_dir, name, identity, specs, overwrite=True)


EXPLANATIONS = {"resid1": {3: "Dogs and cats in stories", 5: "the word cat", 9: "numbers and dates"},
                "mlp2": {1: "Cat food, dog food"}, "signed": {0: "punctuation"}}


def meta_sae(host: HostModel, stage: int = 0, width: int = 32) -> SparseAutoencoder:
    """A BatchTopK meta-SAE over the unit decoder rows of one stage, fitted briefly (its threshold calibrated)."""
    rows = trained(host).runtime.stages[stage].sae.W_dec.detach()
    rows = rows / rows.norm(dim=1, keepdim=True)  # (H, d)
    torch.manual_seed(stage)
    meta = build_sae(SAEConfig("batchtopk", rows.shape[1], width, k=3))
    with one_thread():
        fit_in_memory(meta, rows, steps=40, batch_size=64, lr=1e-2, seed=stage)
    meta.calibrate_threshold_(rows)
    return meta.requires_grad_(False).eval()


def write_dashboard_stack(host: HostModel, out_dir: Path, *, tokens: int = 3000) -> Path:
    """The tiny stack with a meta-SAE on stage 0, dashboards from `tokens` tokens of the default corpus (small
    settings: 4 top examples, 3 tokens of context, 3 quantiles of 2) and EXPLANATIONS."""
    from core.stack.dashboards import attach_explanations
    from trainer.dashboards.accumulator import DashboardSettings
    from trainer.dashboards.build import build_dashboards
    from trainer.data.corpus import load_corpus

    path = write_tiny_stack(host, out_dir, meta_saes={0: meta_sae(host)})
    settings = DashboardSettings(top_n=4, context=3, quantiles=3, per_quantile=2, logit_n=5, neighbours=4,
                                 cooccurrence=4)
    with one_thread():
        build_dashboards(path, host, load_corpus("default")[:8], corpus="default", settings=settings,
                         context_length=CONTEXT, batch_size=8, max_tokens=tokens, progress=False)
    attach_explanations(path, EXPLANATIONS)
    return path
