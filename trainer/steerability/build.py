"""`featurewire-train steerability`: choose features, measure them in groups, store the records in the stack.

Resumable: after every round the records measured so far are attached to the stack (a hashed JSON file per stage,
core/stack/steerability.py), and a later run with the same settings skips the features already stored. Under
torchrun each rank measures every world-th feature of a round; rank 0 gathers the round and writes the stack, so
every rank runs the same number of rounds and collectives.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from core.host.host_model import HostModel
from core.stack.identity import HostModelIdentity
from core.stack.reader import LoadedStack, LoadedStage, read_stack
from core.stack.runtime import StackRuntime
from core.stack.steerability import attach_steerability, load_stage_steerability
from trainer.steerability.measure import FeatureTarget, SteerSettings, measure_features, residual_norm
from trainer.steerability.schedule import needs_max
from trainer.training.distributed import LOCAL, Distributed

OPENINGS = Path(__file__).with_name("openings.txt")


def read_openings(path: str | Path | None = None) -> list[str]:
    """The neutral openings: one per line, blank and '#' lines skipped (the shipped set when `path` is None)."""
    source = Path(path) if path is not None else OPENINGS
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the prompt file {source}: {exc}; expected UTF-8 text, one opening per line") \
            from None
    lines = [line.strip() for line in text.splitlines()]
    openings = [line for line in lines if line and not line.startswith("#")]
    if not openings:
        raise ValueError(f"the prompt file {source} has no openings; expected one non-empty line per opening")
    return openings


@dataclass(frozen=True)
class Selection:
    stage: int
    features: tuple[int, ...]


def _density(stage: LoadedStage) -> torch.Tensor | None:
    if stage.dashboard is None:
        return None
    tokens = max(int(stage.dashboard_record.get("tokens", 0)), 1)
    return stage.dashboard["count"].sum(0).double() / tokens  # (H,)


def resolve_stages(stack: LoadedStack, stage: str | None) -> list[int]:
    if stage is None:
        return [s.index for s in stack.stages]
    names = [s.name for s in stack.stages]
    if stage in names:
        return [names.index(stage)]
    if stage.isdigit() and int(stage) < len(names):
        return [int(stage)]
    raise ValueError(f"unknown stage {stage!r}; the stack's stages are {names} (or their indices 0..{len(names) - 1})")


def parse_features(text: str, d_sae: int, stage_name: str) -> tuple[int, ...]:
    """Feature ids from `3,17,250`; every id must lie in [0, d_sae)."""
    out = []
    for item in text.split(","):
        if not item.strip().isdigit() or int(item) >= d_sae:
            raise ValueError(f"unknown feature {item.strip()!r} for stage {stage_name!r}: "
                             f"allowed ids are 0..{d_sae - 1}, comma-separated")
        out.append(int(item))
    return tuple(dict.fromkeys(out))


def select(stack: LoadedStack, stages: Sequence[int], *, features: str | None, sample: int | None,
           density: tuple[float, float], seed: int) -> list[Selection]:
    """Explicit features (one stage), or `sample` random features per stage with dashboard density in range."""
    if features is not None:
        if len(stages) != 1:
            raise ValueError("--features needs --stage: the ids are one stage's")
        stage = stack.stages[stages[0]]
        return [Selection(stage.index, parse_features(features, stage.sae.d_sae, stage.name))]
    out = []
    for index in stages:
        stage = stack.stages[index]
        found = _density(stage)
        if found is None:
            raise ValueError(f"stage {stage.name!r} has no dashboard, so features cannot be sampled by density; run "
                             "`featurewire-train dashboards` first, or name them with --stage and --features")
        pool = ((found >= density[0]) & (found <= density[1])).nonzero(as_tuple=True)[0].tolist()
        if not pool:
            raise ValueError(f"stage {stage.name!r} has no feature with density in [{density[0]:g}, {density[1]:g}] "
                             f"(its densities run from {float(found.min()):.3g} to {float(found.max()):.3g}); "
                             "widen --density or name features with --features")
        chosen = sorted(random.Random(f"{seed}:{stage.name}").sample(pool, min(sample or 0, len(pool))))
        out.append(Selection(index, tuple(chosen)))
    return out


def text_candidates(host: HostModel, stack: LoadedStack, stage_index: int, text: str, top: int) -> Selection:
    """The `top` features of one stage that `text` activates most: max |z| over its tokens, special tokens (BOS)
    left out. The same ranking as SearchFeatures' text query with REDUCTION_MAX, so a client that searches the
    text finds these features first and can read their measured steerability."""
    if not text.strip():
        raise ValueError("--text must contain some text")
    if top < 1:
        raise ValueError(f"--top must be at least 1, got {top}")
    runtime = StackRuntime.from_loaded(stack)
    needed = runtime.dependencies([stage_index])
    ids = host.encode(text)  # (1, T) with the tokenizer's special tokens
    special = set(host.tokenizer.all_special_ids)
    keep = torch.tensor([int(i) not in special for i in ids[0].tolist()])  # (T,)
    if not bool(keep.any()):
        raise ValueError("--text has no token besides special tokens")
    with torch.inference_mode():
        hookpoints = [runtime.stages[i].hookpoint for i in needed]
        captures = host.forward(ids, reads=hookpoints).captures
        result = runtime.decompose({hp: captures[hp][0] for hp in hookpoints}, [stage_index])[stage_index]
        peak = result.codes[keep].abs().amax(dim=0)  # (H,)
    order = peak.argsort(descending=True)[:top]
    return Selection(stage_index, tuple(sorted(int(f) for f in order.tolist() if float(peak[f]) > 0)))


def targets_for(stage: LoadedStage, features: Sequence[int], concept_n: int = 20) -> list[FeatureTarget]:
    """Each feature's side (the one it fires on most), held-out max, density and top firing tokens."""
    board = stage.dashboard
    if board is None:
        return [FeatureTarget(f) for f in features]
    tokens = max(int(stage.dashboard_record.get("tokens", 0)), 1)
    context = int(stage.dashboard_record.get("context", (board["top_tokens"].shape[-1] - 1) // 2))
    out = []
    for f in features:
        counts = board["count"][:, f]  # (S,)
        side = int(counts.argmax()) if counts.numel() > 1 else 0
        centre = board["top_tokens"][side, f, :concept_n, context]  # (n,) firing tokens of the top examples
        concept = tuple(dict.fromkeys(int(t) for t in centre.tolist() if t >= 0))
        out.append(FeatureTarget(f, -1 if side == 1 else 1, float(board["max"][side, f]) or None,
                                 float(counts.sum()) / tokens, concept))
    return out


def check_targets(stage: LoadedStage, targets: Sequence[FeatureTarget], settings: SteerSettings) -> None:
    if not needs_max(settings.strengths):
        return
    if stage.dashboard is None:
        raise ValueError(f"stage {stage.name!r} has no dashboard, and strengths in units of max need each feature's "
                         "held-out max: run `featurewire-train dashboards` first, or use only add:norm:... strengths")
    silent = [t.index for t in targets if not t.max_activation]
    if silent:
        raise ValueError(f"stage {stage.name!r}: features {silent[:8]} never fired in the dashboard pass, so units of "
                         "max are undefined for them; choose features that fired or use add:norm:... strengths")


def run_steerability(stack_dir: str | Path, host: HostModel, selections: Sequence[Selection], settings: SteerSettings,
                     openings: Sequence[str], *, group: int = 4, parallel: Distributed = LOCAL,
                     progress: bool = True) -> dict[str, Any]:
    """Measure every selected feature not stored yet with these settings; returns counts and timings."""
    stack = read_stack(stack_dir, expect_model=HostModelIdentity.from_model(host.model, host.name), device=host.device)
    runtime = StackRuntime.from_loaded(stack)
    prompt_ids = [tuple(host.tokenizer(text).input_ids) for text in openings]
    wanted = settings.record() | {"openings": list(openings)}
    summary: dict[str, Any] = {"features": 0, "skipped": 0, "tokens": 0, "seconds": 0.0, "world": parallel.world}
    started = time.perf_counter()
    for selection in selections:
        stage = stack.stages[selection.stage]
        targets = targets_for(stage, selection.features)
        check_targets(stage, targets, settings)
        stored = load_stage_steerability(stack_dir, stage.index)
        records = dict(stored["features"]) if stored and stored.get("settings") == wanted else {}
        todo = [t for t in targets if t.index not in records]
        summary["skipped"] += len(targets) - len(todo)
        norm = residual_norm(host, stage.hookpoint, prompt_ids)
        per_feature = len(prompt_ids) * (1 + settings.samples) * sum(not s.is_identity for s in settings.strengths)
        bar = tqdm(total=len(todo), unit="feature", desc=f"steerability {stage.name}",
                   disable=not (progress and parallel.is_main))
        step = group * parallel.world
        for lo in range(0, len(todo), step):
            mine = todo[lo:lo + step][parallel.rank::parallel.world]
            measured = measure_features(host, runtime, stage.index, mine, prompt_ids, settings, norm) if mine else []
            for part in parallel.gather_objects(measured):
                records.update({r["feature"]: r for r in part})
            if parallel.is_main:
                attach_steerability(stack_dir, {stage.index: {"stage": stage.name, "settings": wanted,
                                                              "residual_norm": norm, "features": records}})
            done = len(todo[lo:lo + step])
            summary["features"] += done
            summary["tokens"] += done * per_feature * settings.max_new_tokens
            bar.update(done)
        bar.close()
    summary["seconds"] = time.perf_counter() - started
    return summary


def describe(stack: LoadedStack) -> list[str]:
    """One line per stage with stored steerability: how many features steer, and at which strengths."""
    lines = []
    for stage in stack.stages:
        data = stage.steerability
        if not data:
            continue
        records = list(data["features"].values())
        steer = [r for r in records if r["verdict"]["steers"]]
        best = sorted(f"{r['verdict']['best']['op']}:{r['verdict']['best']['unit']}:{r['verdict']['best']['value']:g}"
                      for r in steer)
        scores = [r["output_score"] for r in records if r.get("output_score") is not None]
        lines.append(f"{stage.name}: {len(steer)}/{len(records)} features steer"
                     + (f" (best strengths: {', '.join(best)})" if best else "")
                     + (f"; output score median {sorted(scores)[len(scores) // 2]:.3f}" if scores else ""))
    return lines
