"""`featurewire-train explain`: LLM explanations of a stack's features from their dashboards, scored on held-out
examples, stored in the stack's explanations record (core/stack/explanations.py).

Per feature (its positive side; a signed stage's negative side is not explained yet):
1. Examples from the dashboard: the top examples and the quantile-sampled ones, each a window with the feature's
   value at every token. Every other example is shown to the explainer (up to SHOWN); the rest are held out
   (up to HELD_OUT) and never shown.
2. Non-activating examples: windows of other features' top examples of the same stage on which this feature is
   exactly zero at every token, checked by reading the window (after BOS) through the host model and the stack.
3. The explainer's answer is parsed (prompts.py); detection asks about held-out activating and non-activating
   excerpts, fuzzing about held-out excerpts with their real marks or as many wrong ones; each is balanced
   accuracy with its number of examples.
Features already explained with the same explainer, prompt version and shown examples are skipped, so a run
that stopped resumes; finished features are merged into the stack in one atomic write even when a later feature
fails. The HTTP calls of different features run in parallel, at most `concurrency` at a time.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from core.host.host_model import HostModel
from core.stack.explanations import merge_records, read_records
from core.stack.reader import LoadedStack, read_stack
from core.stack.runtime import StackRuntime
from trainer.explain.endpoint import Endpoint
from trainer.explain.prompts import (
    PROMPT_VERSION,
    detection_prompt,
    explainer_prompt,
    fuzzing_prompt,
    parse_explanation,
    render,
    score,
)

SHOWN = 20
HELD_OUT = 10
QUIET_SEARCH = 40  # windows of other features read per held-out example, at most, to find non-activating ones


@dataclass(frozen=True)
class Window:
    ids: tuple[int, ...]
    acts: tuple[float, ...]  # the feature's signed value at each token

    def firing(self) -> list[bool]:
        return [a > 0 for a in self.acts]


@dataclass(frozen=True)
class Job:
    """Everything one feature's requests need, prepared before any request is sent."""

    stage: str
    feature: int
    shown: tuple[str, ...]  # marked excerpts for the explainer
    digest: str  # of the shown windows: part of the resume key
    held: tuple[Window, ...]
    quiet: tuple[Window, ...]  # non-activating


def _windows(d: dict[str, torch.Tensor], feature: int) -> list[Window]:
    """The positive side's top examples, then its quantile examples interval by interval, empty slots dropped."""
    out = []
    for group, index in (("top", (0, feature)), ("quantile", (0, feature))):
        docs, tokens, acts = d[f"{group}_doc"][index], d[f"{group}_tokens"][index], d[f"{group}_acts"][index]
        docs, tokens, acts = docs.reshape(-1), tokens.reshape(-1, tokens.shape[-1]), acts.reshape(-1, acts.shape[-1])
        for j in range(docs.shape[0]):  # (n,) or (Q*m,)
            if int(docs[j]) < 0:
                continue
            keep = [k for k, t in enumerate(tokens[j].tolist()) if t >= 0]
            out.append(Window(tuple(int(tokens[j, k]) for k in keep), tuple(float(acts[j, k]) for k in keep)))
    return out


def _feature_values(host: HostModel, runtime: StackRuntime, stage: int, feature: int,
                    windows: Sequence[Window]) -> list[list[float]]:
    """The feature's value at every token of each window read on its own after BOS; windows of one length go
    through the model as one batch."""
    bos = [host.tokenizer.bos_token_id] if host.tokenizer.bos_token_id is not None else []
    out: dict[int, list[float]] = {}
    by_length: dict[int, list[int]] = {}
    for n, w in enumerate(windows):
        by_length.setdefault(len(w.ids), []).append(n)
    with torch.inference_mode():
        for length, members in by_length.items():
            ids = torch.tensor([bos + list(windows[n].ids) for n in members], dtype=torch.int64)  # (B, T)
            captures = host.forward(ids, reads=runtime.hookpoints, logits=False).captures  # (B, T, d) each
            rows = {hp: captures[hp].reshape(-1, captures[hp].shape[-1]) for hp in runtime.hookpoints}  # (B*T, d)
            codes = runtime.decompose(rows, [stage])[stage].codes  # (B*T, H)
            codes = codes.reshape(len(members), -1, codes.shape[-1])  # (B, T, H)
            for n, row in zip(members, codes[:, -length:, feature].float().tolist(), strict=True):  # (B, length)
                out[n] = row
    return [out[n] for n in range(len(windows))]


def prepare(host: HostModel, stack: LoadedStack, runtime: StackRuntime, stage: int, feature: int,
            text) -> Job | None:
    """The feature's job, or None when it has too few examples to show and hold out (it fired too rarely)."""
    d = stack.stages[stage].dashboard
    assert d is not None
    windows = _windows(d, feature)
    shown, held = windows[::2][:SHOWN], windows[1::2][:HELD_OUT]
    if len(shown) < 2 or len(held) < 2:
        return None
    rng = random.Random(f"{stage}:{feature}")
    others = [f for f in range(d["top_doc"].shape[1]) if f != feature and int(d["top_doc"][0, f, 0]) >= 0]
    rng.shuffle(others)
    quiet: list[Window] = []
    step = 4 * len(held)
    for chunk in range(0, min(len(others), QUIET_SEARCH * len(held)), step):  # stop once enough are found
        candidates = [w for f in others[chunk : chunk + step] for w in _windows(d, f)[:1]]
        values = _feature_values(host, runtime, stage, feature, candidates)
        quiet += [Window(w.ids, tuple(v)) for w, v in zip(candidates, values, strict=True) if not any(v)]
        if len(quiet) >= len(held):
            break
    if len(quiet) < 2:
        return None
    for w in held + quiet:  # decode every token now, so the request threads only read the cache
        text(w.ids)
    excerpts = tuple(render(text(w.ids), w.firing()) for w in shown)
    digest = hashlib.sha256(json.dumps([[w.ids, w.firing()] for w in shown]).encode()).hexdigest()
    return Job(stack.stages[stage].name, feature, excerpts, digest, tuple(held), tuple(quiet[: len(held)]))


def run_job(job: Job, explainer: Endpoint, scorer: Endpoint, text) -> dict[str, Any]:
    """Ask for the explanation, then score it; the record to store."""
    explanation = parse_explanation(explainer.complete(explainer_prompt(job.shown)))
    detect = [detection_prompt(explanation, render(text(w.ids), [False] * len(w.ids))) for w in job.held + job.quiet]
    rng = random.Random(job.digest)
    fuzz, truth = [], []
    for w in job.held:
        real = w.firing()
        others = [k for k, m in enumerate(real) if not m]
        fuzz.append(fuzzing_prompt(explanation, render(text(w.ids), real)))
        truth.append(True)
        if others:
            wrong = set(rng.sample(others, min(sum(real), len(others))))
            fuzz.append(fuzzing_prompt(explanation, render(text(w.ids), [k in wrong for k in range(len(real))])))
            truth.append(False)
    def ask(prompt: str) -> str:
        return scorer.complete(prompt, max_tokens=4)  # "yes" or "no"

    scores = {"detection": score(ask, detect, [True] * len(job.held) + [False] * len(job.quiet))}
    if False in truth:
        scores["fuzzing"] = score(ask, fuzz, truth)
    return {"text": explanation, "source": "llm", "explainer": explainer.config.model, "scorer": scorer.config.model,
            "prompt_version": PROMPT_VERSION, "examples": job.digest,
            "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "scores": scores}


def explain_stack(stack_dir: str | Path, host: HostModel, explainer: Endpoint, scorer: Endpoint, *,
                  stages: Sequence[str] | None = None, features: Sequence[int] | None = None, sample: int | None = None,
                  concurrency: int = 4, progress: bool = True, seed: int = 0) -> dict[str, Any]:
    """Explain and score the chosen features; returns counts (explained, skipped, unusable, failed with reasons)
    and the usage. Raises the first endpoint error after storing what finished before it."""
    stack = read_stack(stack_dir)
    runtime = StackRuntime.from_loaded(stack)
    existing = read_records(stack_dir)
    token_cache: dict[int, str] = {}

    def text(ids: Sequence[int]) -> list[str]:
        for i in ids:
            if i not in token_cache:
                token_cache[i] = host.decode([i], skip_special_tokens=False)
        return [token_cache[i] for i in ids]

    chosen = [s for s in stack.stages if s.dashboard is not None and (not stages or s.name in stages)]
    if stages and len(chosen) != len(set(stages)):
        raise ValueError(f"--stage: each must be a stage with dashboards; stages with dashboards: "
                         f"{[s.name for s in stack.stages if s.dashboard is not None]}")
    if not chosen:
        raise ValueError("the stack has no dashboards to explain from; run `featurewire-train dashboards` first")
    jobs, skipped, unusable = [], 0, 0
    for stage in chosen:
        fired = (stage.dashboard["count"][0] > 0).nonzero().flatten().tolist()
        wanted = [f for f in (features if features is not None else fired) if 0 <= f < stage.sae.d_sae]
        if features is not None and len(wanted) != len(features):
            raise ValueError(f"--features: ids must be in 0..{stage.sae.d_sae - 1} for stage {stage.name!r}")
        if sample is not None:
            wanted = sorted(random.Random(seed).sample(wanted, min(sample, len(wanted))))
        for f in wanted:
            job = prepare(host, stack, runtime, stage.index, f, text)
            if job is None:
                unusable += 1
                continue
            old = existing.get(job.stage, {}).get(f)
            if isinstance(old, dict) and (old.get("explainer"), old.get("prompt_version"), old.get("examples")) == (
                    explainer.config.model, PROMPT_VERSION, job.digest):
                skipped += 1
                continue
            jobs.append(job)
    done: dict[str, dict[int, dict[str, Any]]] = {}
    failed: dict[str, str] = {}
    fatal: Exception | None = None
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool, \
            tqdm(total=len(jobs), desc="explain", unit="feature", disable=not progress) as bar:
        futures = {pool.submit(run_job, job, explainer, scorer, text): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            bar.update(1)
            try:
                done.setdefault(job.stage, {})[job.feature] = future.result()
            except ValueError as exc:  # a refused or unusable answer: this feature only
                failed[f"{job.stage}:{job.feature}"] = str(exc)
            except Exception as exc:  # the endpoint itself: stop, keeping what finished
                fatal = fatal or exc
                for other in futures:
                    other.cancel()
    if done:
        merge_records(stack_dir, done)
    if fatal is not None:
        raise fatal
    usage = explainer.usage  # the scorer shares it when both talk to one endpoint (cli.py)
    return {"explained": sum(len(t) for t in done.values()), "skipped": skipped, "unusable": unusable,
            "failed": failed, "requests": usage.requests, "retries": usage.retries,
            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
