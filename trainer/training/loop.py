"""The training pipeline: collect activations once (on every torchrun rank), fit every stage from that one pass,
evaluate, export.

`run_training(cfg, out_dir)` lays out a run directory:
    out_dir/activations/   the activation store (reused when the collection settings are unchanged)
    out_dir/calibration/   ReSAE only: calibration-split activations the affine maps are fitted on
    out_dir/checkpoint/    the latest checkpoint (a rerun resumes from it)
    out_dir/stack/         the finished stack (the contract with the service)
    out_dir/report.json    configuration, training summary and evaluation metrics per stage
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from core.config import default_cache_dir
from core.host.host_model import HostModel
from core.host.loading import load_host_model
from core.sae.base import l0
from core.sae.batchtopk import BatchTopKSAE
from core.sae.registry import build_sae
from core.stack.affine import AffineMap
from core.stack.error_predictor import ErrorPredictor
from core.stack.identity import HostModelIdentity
from core.stack.runtime import RuntimeStage, StackRuntime
from core.stack.writer import StageSpec, write_stack
from trainer.dashboards.accumulator import DashboardSettings
from trainer.dashboards.build import build_dashboards
from trainer.data.activations import ActivationManifest, collect_activations, iterate_batches
from trainer.data.corpus import Document, Splits, load_corpus_mix, split_documents
from trainer.data.generated import GeneratedSource
from trainer.data.mixing import uses_generated
from trainer.evaluation.cooccurrence import cooccurrence_metrics
from trainer.evaluation.evaluate import evaluate_runtime
from trainer.training.checkpoint import StageTrainingState, load_checkpoint, save_checkpoint
from trainer.training.config import TrainConfig
from trainer.training.distributed import LOCAL, Distributed
from trainer.training.error_predictors import fit_error_predictors
from trainer.training.meta_sae import build_meta_state, meta_metrics, meta_phase, meta_phase_due, penalty_term
from trainer.training.optimization import (
    DeadLatentTracker,
    fve,
    lr_factor,
    make_optimizer,
    sparsity_factor,
    train_step,
)
from trainer.training.residualize import fit_residual_maps

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "collection.fingerprint"


@dataclass(frozen=True)
class TrainResult:
    stack_dir: Path
    report: dict[str, Any]


class LapClock:
    """Wall seconds per phase of a run: each `lap(name)` books the time since the previous lap under `name`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now


def format_phases(seconds: dict[str, float]) -> str:
    """One line per phase with its wall time and share of the total, then the total (what `train` prints)."""
    total = sum(seconds.values())
    lines = [f"  {name:<24} {value:8.1f} s {value / max(total, 1e-9):7.1%}" for name, value in seconds.items()]
    return "\n".join(["phases:", *lines, f"  {'total':<24} {total:8.1f} s"])


def load_host(cfg: TrainConfig, cache_dir: Path | None = None) -> HostModel:
    model = cfg.model.to_model_config()
    return load_host_model(replace(model, cache_dir=cache_dir) if cache_dir else model)


def training_corpus(cfg: TrainConfig, host: HostModel | None = None, cache_dir: Path | None = None,
                    progress: bool = False) -> tuple[Splits, dict[str, Any]]:
    """The corpus's splits and its provenance (recorded in every activation manifest). The generated source
    needs `host`; it is sampled once into the cache (cache_dir, else FEATUREWIRE_CACHE or ~/.cache/featurewire)."""
    c = cfg.corpus
    source = None
    if host is not None:
        source = GeneratedSource(host, c.effective_generation(), cache_dir or default_cache_dir(os.environ),
                                 progress=progress)
    docs, shares = load_corpus_mix(c.spec, c.text_field, generated=source, mix_seed=c.split_seed)
    provenance: dict[str, Any] = {"spec": c.spec, "sources": shares}
    if source is not None and source.result is not None:
        provenance["generated"] = source.result.provenance
    splits = split_documents(docs, calibration_fraction=c.calibration_fraction, eval_fraction=c.eval_fraction,
                             seed=c.split_seed)
    return splits, provenance


def corpus_splits(cfg: TrainConfig, host: HostModel | None = None) -> Splits:
    return training_corpus(cfg, host)[0]


def _training_corpus_once(cfg: TrainConfig, host: HostModel, cache_dir: Path | None, progress: bool,
                          parallel: Distributed) -> tuple[Splits, dict[str, Any]]:
    """Under torchrun rank 0 samples the generated source (when the cache misses) and the others then read
    the cache, instead of every rank sampling the same text."""
    if parallel.world == 1 or not uses_generated(cfg.corpus.spec):
        return training_corpus(cfg, host, cache_dir, progress)
    if parallel.is_main:
        result = training_corpus(cfg, host, cache_dir, progress)
    parallel.barrier()
    if not parallel.is_main:
        result = training_corpus(cfg, host, cache_dir, progress=False)
    return result


def _shuffled(documents: list[Document], seed: int) -> list[Document]:
    """A seeded document order, so a token cap samples the whole corpus rather than its first files."""
    shuffled = list(documents)
    random.Random(seed).shuffle(shuffled)
    return shuffled


def _store_fingerprint(cfg: TrainConfig, max_tokens: int | None) -> str:
    return f"{cfg.collection_fingerprint()}:{max_tokens or cfg.activations.max_tokens}"


def store_is_current(directory: Path, cfg: TrainConfig, max_tokens: int | None = None) -> bool:
    """Whether `directory` holds a store collected with these settings (checked without the host model)."""
    marker = directory / FINGERPRINT_FILE
    return marker.is_file() and marker.read_text() == _store_fingerprint(cfg, max_tokens)


def ensure_activations(host: HostModel, documents: list[Document], cfg: TrainConfig, directory: Path,
                       progress: bool, *, max_tokens: int | None = None, parallel: Distributed = LOCAL,
                       corpus: dict[str, Any] | None = None) -> ActivationManifest:
    """Reuse the store when it was collected with the same settings, else collect it (again). Under torchrun
    every rank calls this: rank 0 decides, and each rank collects its slice of the batches."""
    if parallel.main_value(store_is_current(directory, cfg, max_tokens)):
        return ActivationManifest.load(directory)
    a = cfg.activations
    max_tokens = max_tokens or a.max_tokens
    if parallel.is_main:  # gone while the store is rewritten, so a crash never leaves a store that looks current
        (directory / FINGERPRINT_FILE).unlink(missing_ok=True)
    manifest = collect_activations(
        host, _shuffled(documents, cfg.corpus.split_seed), list(cfg.stack.hookpoints), out_dir=directory,
        context_length=a.context_length, batch_size=a.batch_size, max_tokens=max_tokens, dtype=a.dtype,
        shard_tokens=a.shard_tokens, overwrite=True, progress=progress, parallel=parallel, corpus=corpus,
    )
    if parallel.is_main:
        (directory / FINGERPRINT_FILE).write_text(_store_fingerprint(cfg, max_tokens))
    return manifest


def _build_states(cfg: TrainConfig, manifest: ActivationManifest, device: torch.device) -> list[StageTrainingState]:
    torch.manual_seed(cfg.training.seed)
    states = []
    for index, hookpoint in enumerate(cfg.stack.hookpoints):
        sae = build_sae(cfg.sae.sae_config(manifest.d(hookpoint), index)).to(device)
        tracker = DeadLatentTracker(sae.d_sae, cfg.training.dead_after_tokens, device)
        states.append(StageTrainingState(sae, make_optimizer(sae, cfg.training.lr), tracker))
    for state in states if cfg.meta_sae else []:  # built after every primary: same primaries as a solo run
        state.meta = build_meta_state(cfg.meta_sae, state.sae.W_dec, cfg.training.lr)
    return states


def build_runtime(cfg: TrainConfig, manifest: ActivationManifest, states: list[StageTrainingState],
                  maps: list[AffineMap]) -> StackRuntime:
    """The stack as it trains: stage 0 (and every stage of a plain stack) scales its activation; with
    residualize, stage m+1 reads the residual of maps[m] applied to stage m's hookpoint."""
    stages = []
    for i, (hookpoint, state) in enumerate(zip(cfg.stack.hookpoints, states, strict=True)):
        affine = maps[i - 1] if maps and i > 0 else None
        scale = affine.residual_scale if affine else manifest.scale(hookpoint)
        stages.append(RuntimeStage(i, hookpoint, hookpoint, state.sae, scale, i - 1 if affine else None, affine))
    return StackRuntime(stages)


def sae_inputs(runtime: StackRuntime, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """What each stage's SAE trains on, from a batch of raw activations {hookpoint: (B, d)}."""
    return [runtime.sae_input(stage, batch[stage.hookpoint],
                              None if stage.residual_of is None else batch[runtime.stages[stage.residual_of].hookpoint])
            for stage in runtime.stages]


def total_steps(cfg: TrainConfig, manifest: ActivationManifest) -> int:
    budget = cfg.training.token_budget or manifest.total_tokens
    return max(1, budget // cfg.training.batch_size)


def fit_stages(cfg: TrainConfig, manifest: ActivationManifest, states: list[StageTrainingState],
               runtime: StackRuntime, checkpoint_dir: Path, *, progress: bool = True,
               on_step: Callable[[int], None] | None = None, parallel: Distributed = LOCAL,
               histories: list[list[dict[str, Any]]] | None = None) -> list[dict[str, float]]:
    """Train all stages on the same batches (one activation pass feeds them all); resumable. Under torchrun,
    `parallel` splits each batch's rows or the stages across ranks (trainer/training/distributed.py).
    With `training.history_every`, `histories` (one list per stage) receives the stages' training histories
    (`history_entry`) from the steps this call runs (a resumed run's history starts at its checkpoint)."""
    t = cfg.training
    hookpoints = list(cfg.stack.hookpoints)
    steps = total_steps(cfg, manifest)
    start = load_checkpoint(checkpoint_dir, cfg.fingerprint(), states)
    parallel.prepare(states)
    device = states[0].tracker.tokens_since_fired.device
    batches = iterate_batches(manifest, hookpoints, t.batch_size, buffer_tokens=t.buffer_tokens, seed=t.seed,
                              device=device, epochs=None, skip_batches=start, drop_last=True, normalize=False)
    batches = parallel.local_rows(batches)
    recent: list[list[dict[str, float]]] = [[] for _ in states]
    observers = [DeadLatentTracker(state.sae.d_sae, max(t.history_windows), device) if t.history_every else None
                 for state in states]
    bar = tqdm(total=steps * t.batch_size, initial=start * t.batch_size, unit="tok", unit_scale=True,
               desc="train", disable=not progress)
    with bar:
        for step in range(start, steps):
            with torch.no_grad():
                inputs = sae_inputs(runtime, next(batches))
            if step == 0:
                for x, state in zip(inputs, states, strict=True):
                    state.sae.init_b_dec_(parallel.gather_rows(x))
            for i, (x, state, log) in enumerate(zip(inputs, states, recent, strict=True)):
                if parallel.owns(i):
                    log.append(_step_stage(cfg, state, x, step, steps, parallel, observers[i]))
                    del log[:-50]
                    if histories is not None and t.history_every and ((step + 1) % t.history_every == 0
                                                                      or step + 1 == steps):
                        histories[i].append(history_entry(step + 1, t.batch_size, log[-1], observers[i],
                                                          t.history_windows, seen=(step + 1 - start) * t.batch_size))
            bar.update(t.batch_size)
            bar.set_postfix(_mean_postfix(recent), refresh=False)
            if (step + 1) % t.checkpoint_every == 0 or step + 1 == steps:
                parallel.collect_stages(states)
                if parallel.is_main:
                    save_checkpoint(checkpoint_dir, step + 1, cfg.fingerprint(), states)
            if on_step is not None:
                on_step(step)
    return parallel.finish(states, [{k: sum(r[k] for r in log) / len(log) for k in log[0]} if log else {}
                                    for log in recent])


def history_entry(steps_done: int, batch_size: int, log: dict[str, float], observer: DeadLatentTracker | None,
                  windows: tuple[int, ...], *, seen: int) -> dict[str, Any]:
    """One point of a stage's training history: this step's loss, L0, FVE and `dead_fraction` (the
    training tracker's, whose revivals restart a latent's window), and `dead_over_W`, the share of latents that
    fired on none of the last W tokens, for each window W no longer than the `seen` tokens observed (else null)."""
    entry: dict[str, Any] = {"step": steps_done, "tokens": steps_done * batch_size, **log}
    for window in windows:
        dead = (observer.tokens_since_fired >= window).float().mean() if observer is not None else None
        entry[f"dead_over_{window}"] = float(dead) if dead is not None and seen >= window else None
    return entry


def _step_stage(cfg: TrainConfig, state: StageTrainingState, x: torch.Tensor, step: int, steps: int,
                parallel: Distributed = LOCAL, observer: DeadLatentTracker | None = None) -> dict:
    t = cfg.training
    for group in state.optimizer.param_groups:
        group["lr"] = t.lr * lr_factor(step, t.warmup_steps, steps, t.lr_decay_fraction)
    dead = state.tracker.dead_mask()
    penalty = penalty_term(state.meta, cfg.meta_sae) if state.meta and cfg.meta_sae else None
    out = train_step(state.sae, state.optimizer, x, sparsity_scale=sparsity_factor(step, t.sparsity_warmup_steps),
                     dead_mask=dead, sync_grads=parallel.gradient_sync, penalty=penalty)
    firing = parallel.firing(out.z)
    state.tracker.record(*firing)
    if observer is not None:  # never revived: a dead latent stays dead until it fires
        observer.record(*firing)
    if bool(dead.any()) and state.sae.reset_dead_(dead):
        state.tracker.revived(dead)
    log = {"loss": float(out.losses["total"]), "l0": float(l0(out.z).float().mean()),
           "fve": fve(x, out.x_hat), "dead_fraction": float(dead.float().mean())}
    if state.meta and cfg.meta_sae:  # meta-SAE regularisation: alternate with a meta phase
        log["meta_penalty"] = float(out.losses["penalty"])
        if meta_phase_due(step, cfg.meta_sae):
            meta_phase(state.sae.W_dec, state.meta, cfg.meta_sae.meta_steps)
    return log


def _mean_postfix(recent: list[list[dict[str, float]]]) -> dict[str, str]:
    last = [log[-1] for log in recent if log]
    return {k: f"{sum(r[k] for r in last) / len(last):.3g}" for k in ("loss", "l0", "fve")} if last else {}


CALIBRATION_TOKENS = 16_384


@torch.no_grad()
def _calibrate_thresholds(cfg: TrainConfig, manifest: ActivationManifest, runtime: StackRuntime) -> None:
    """BatchTopK serves with one global threshold: set it so the mean L0 on training activations is k
    (the running estimate from training batches is only approximately that)."""
    if not any(isinstance(s.sae, BatchTopKSAE) for s in runtime.stages):
        return
    device = runtime.stages[0].sae.W_dec.device
    rows = min(CALIBRATION_TOKENS, manifest.total_tokens)
    sample = next(iterate_batches(manifest, list(cfg.stack.hookpoints), rows, seed=cfg.training.seed + 1,
                                  device=device, normalize=False))
    for stage, x in zip(runtime.stages, sae_inputs(runtime, sample), strict=True):
        if isinstance(stage.sae, BatchTopKSAE):
            stage.sae.calibrate_threshold_(x)


def fit_calibrated_maps(host: HostModel, splits: Splits, cfg: TrainConfig, out_dir: Path, progress: bool,
                        parallel: Distributed = LOCAL, corpus: dict[str, Any] | None = None) -> list[AffineMap]:
    """Collect the calibration split's activations (their own store) and fit the ReSAE affine maps."""
    store = Path(f"{cfg.activations.store}-calibration") if cfg.activations.store else out_dir / "calibration"
    calibration = ensure_activations(host, splits.calibration, cfg, store, progress,
                                     max_tokens=cfg.stack.calibration_tokens, parallel=parallel, corpus=corpus)
    return fit_residual_maps(calibration, list(cfg.stack.hookpoints))


def fit_held_out_predictors(host: HostModel, splits: Splits, cfg: TrainConfig, out_dir: Path, runtime: StackRuntime,
                            progress: bool, corpus: dict[str, Any] | None = None) -> list[ErrorPredictor]:
    """Fit every stage's error probes on calibration-split activations (never training tokens); the ReSAE
    calibration store is reused when the token counts agree, else the probes get their own store."""
    tokens = cfg.stack.error_predictor_tokens or cfg.stack.calibration_tokens
    name = "calibration" if tokens == cfg.stack.calibration_tokens else "error-calibration"
    store = Path(f"{cfg.activations.store}-{name}") if cfg.activations.store else out_dir / name
    held_out = ensure_activations(host, splits.calibration, cfg, store, progress, max_tokens=tokens, corpus=corpus)
    batches = iterate_batches(held_out, list(cfg.stack.hookpoints), 4096, seed=cfg.training.seed + 2,
                              device=host.device, normalize=False)
    predictors = fit_error_predictors(runtime, batches)
    for stage, predictor in zip(runtime.stages, predictors, strict=True):
        logger.info("error predictor %s: norm R² %.3f, vector R² %.3f, nonlinear share %.3f", stage.name,
                    predictor.metrics["norm_r2"], predictor.metrics["vector_r2"], predictor.metrics["nonlinear_share"])
    return predictors


def stack_dashboards(cfg: TrainConfig, host: HostModel, splits: Splits, stack_dir: Path,
                     progress: bool) -> dict[str, Any]:
    """The [dashboards] step: every feature's dashboard from the eval split, stored in the new stack."""
    d, a = cfg.dashboards, cfg.activations
    assert d is not None
    settings = DashboardSettings(top_n=d.top_n, context=d.context, quantiles=d.quantiles, per_quantile=d.per_quantile)
    return build_dashboards(stack_dir, host, splits.eval, corpus=cfg.corpus.spec, settings=settings,
                            context_length=a.context_length, batch_size=a.batch_size, max_tokens=d.tokens,
                            progress=progress)


def run_training(cfg: TrainConfig, out_dir: str | Path, *, progress: bool = True, cache_dir: Path | None = None,
                 on_step: Callable[[int], None] | None = None, parallel: Distributed = LOCAL) -> TrainResult:
    out_dir = Path(out_dir)
    parallel = parallel.for_config(cfg)
    progress = progress and parallel.is_main
    started = time.perf_counter()
    laps = LapClock()
    host = load_host(cfg, cache_dir)
    laps.lap("model load")
    splits, corpus = _training_corpus_once(cfg, host, cache_dir, progress, parallel)
    laps.lap("corpus (and generation)")
    store = Path(cfg.activations.store) if cfg.activations.store else out_dir / "activations"
    # Every rank collects its slice of the batches into the one store (the run directory is shared).
    manifest = ensure_activations(host, splits.train, cfg, store, progress, parallel=parallel, corpus=corpus)
    maps = fit_calibrated_maps(host, splits, cfg, out_dir, progress, parallel, corpus) if cfg.stack.residualize else []
    laps.lap("collection")
    states = _build_states(cfg, manifest, host.device)
    runtime = build_runtime(cfg, manifest, states, maps)
    histories: list[list[dict[str, Any]]] = [[] for _ in states]
    summaries = fit_stages(cfg, manifest, states, runtime, out_dir / "checkpoint", progress=progress,
                           on_step=on_step, parallel=parallel, histories=histories)
    laps.lap("training")
    if not parallel.is_main:  # rank 0 evaluates and writes the stack and the report
        return TrainResult(out_dir / "stack", {})
    trained_seconds = time.perf_counter() - started
    _calibrate_thresholds(cfg, manifest, runtime)
    for state in states:
        state.sae.eval()
    e, a = cfg.eval, cfg.activations
    metrics, stack_metrics = evaluate_runtime(host, runtime, splits.eval, context_length=a.context_length,
                                              batch_size=a.batch_size, max_tokens=e.max_tokens,
                                              ce_windows=e.ce_windows, probing=e.probing)
    for m, phi in zip(metrics, cooccurrence_metrics(host, runtime, splits.eval, context_length=a.context_length,
                                                    batch_size=a.batch_size, max_tokens=e.max_tokens), strict=True):
        m.update(phi)
    metas = [meta_metrics(st.sae.W_dec, st.meta.sae, cfg.meta_sae) if st.meta and cfg.meta_sae else {}
             for st in states]
    for m, meta in zip(metrics, metas, strict=True):
        m.update(meta)
    training = {"config": cfg.to_dict(), "config_fingerprint": cfg.fingerprint(),
                "activation_tokens": manifest.total_tokens, "steps": total_steps(cfg, manifest)}
    specs = [
        StageSpec(st.sae, st.hookpoint, st.input_scale, training={**training, "final": summary}, metrics=m,
                  residual_of=st.residual_of, affine=st.affine, meta_sae=state.meta.sae if state.meta else None,
                  meta_metrics=meta)
        for st, state, summary, m, meta in zip(runtime.stages, states, summaries, metrics, metas, strict=True)
    ]
    predictors = fit_held_out_predictors(host, splits, cfg, out_dir, runtime, progress, corpus) \
        if cfg.stack.error_predictors else [None] * len(specs)
    for spec, predictor in zip(specs, predictors, strict=True):
        spec.error_predictor = predictor
    laps.lap("evaluation")
    stack_dir = write_stack(out_dir / "stack", cfg.stack.name, HostModelIdentity.from_model(host.model, host.name),
                            specs, overwrite=True, metrics=stack_metrics)
    report = {"stack": str(stack_dir), "model": asdict(host.summary()), "seconds": time.perf_counter() - started,
              "collect_and_fit_seconds": trained_seconds, **training, "stack_metrics": stack_metrics,
              "affine_maps": [m.metadata() for m in maps],
              "error_predictors": [p.metadata() if p else None for p in predictors],
              "stages": [{"hookpoint": hp, "architecture": st.sae.cfg.architecture, "d_sae": st.sae.d_sae,
                          "training": s, "eval": m, **({"history": h} if cfg.training.history_every else {})}
                         for hp, st, s, m, h in zip(cfg.stack.hookpoints, states, summaries, metrics, histories,
                                                    strict=True)]}
    if cfg.dashboards is not None:  # on rank 0 alone here; `featurewire-train dashboards` spreads over torchrun ranks
        report["dashboards"] = stack_dashboards(cfg, host, splits, stack_dir, progress)
        laps.lap("dashboards")
    report["phases"] = laps.seconds
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    logger.info("stack written to %s", stack_dir)
    return TrainResult(stack_dir, report)
