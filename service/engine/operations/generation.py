"""Generate: prefill and decode steps over a KV cache, with each branch's edit plan hooked into every pass.

Each branch (STEERED, and DEFAULT with `with_default`) has its own KV cache, its own torch.Generator
seeded with the request's seed and its own `EditPlan`: DEFAULT carries no interventions or steering, but
tests the conditions on its own activations (ENABLE there enables nothing; STOP ends that branch). The
branches advance in lock-step, one decode step each per round, STEERED first; a branch that finishes
stops while the other goes on.

Timing of features and conditions: a generated token's activations exist once the token is fed back in,
i.e. in the decode step after it was sampled. When the request asks for per-token features or has
conditions that can test generated positions ("lagged" mode), a TokenEvent is therefore sent one step
after sampling, with its features, followed by the condition events that fired at its position; after
the last token one more pass runs, cut short after the last hookpoint needed (no logits). Otherwise a
TokenEvent is sent as soon as the token is sampled. Either way a token's text delta never splits a UTF-8
character nor releases text that may turn out to start a stop string.

Passes are not run here: each branch hands out a `RowPass` (its tokens, positions, KV cache and write
hooks) and resumes once it is filled. Iterated directly, a `GenerationStream` runs them itself, one row
at a time; the engine's batch scheduler runs them together with other requests' rows
(service/engine/execution/batch.py). Hooks are installed around each forward pass only and removed before
anything is yielded (so a caller that stops iterating, e.g. on cancellation, leaves no hook behind), and
grad mode is switched off the same way; nothing here outlives the generator.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from functools import partial

import torch
from torch import Tensor

from core.errors import InvalidRequest
from core.host.host_model import HostModel
from service.engine.contract.specs import (
    Branch,
    ConditionEvent,
    FinishEvent,
    FinishReason,
    GenerateHeader,
    GenerateSpec,
    Positions,
    SamplingSpec,
    StageCodes,
    TokenEvent,
)
from service.engine.execution.batch import RowCache, RowPass, run_rows
from service.engine.operations.codes import stage_codes
from service.engine.operations.decompose import token_texts
from service.engine.operations.interventions import Chunk, EditPlan, scope_interval
from service.engine.operations.text_stream import TextStream
from service.engine.stacks.served import ServedStack, predicted_error_norm

GenerateEvent = GenerateHeader | TokenEvent | ConditionEvent | FinishEvent
BranchEvent = TokenEvent | ConditionEvent | FinishEvent


class GenerationStream:
    """The events of one Generate request. Iterated directly, it runs its own forward passes one row at a
    time; the engine instead calls `advance()`, which hands out the passes (one row per live branch) so
    it can run them batched with other requests' rows, and resumes the stream once they are filled."""

    def __init__(self, host: HostModel, stack: ServedStack | None, spec: GenerateSpec) -> None:
        self.host = host
        self._script = _script(host, stack, spec)

    def advance(self) -> GenerateEvent | list[RowPass] | None:
        """The next event, or the passes to run before the stream can go on; None at the end."""
        return next(self._script, None)

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> GenerateEvent:
        while True:
            item = self.advance()
            if item is None:
                raise StopIteration
            if not isinstance(item, list):
                return item
            for row in item:  # alone: one row per pass, the same shapes as a lone request always had
                run_rows(self.host, [row])

    def close(self) -> None:
        self._script.close()


def generate_events(host: HostModel, stack: ServedStack | None, spec: GenerateSpec) -> GenerationStream:
    """Stream a generation: the header, then per decode step each live branch's events, then its finish."""
    return GenerationStream(host, stack, spec)


def _script(host: HostModel, stack: ServedStack | None,
            spec: GenerateSpec) -> Iterator[GenerateEvent | list[RowPass]]:
    """The header, then rounds: every live branch's events up to its next pass, then those passes."""
    branches = (Branch.STEERED, Branch.DEFAULT) if spec.with_default else (Branch.STEERED,)
    stages = spec.decompose.stages if spec.decompose is not None else ()
    prompt = tuple(zip(spec.prompt_ids, token_texts(host.tokenizer, spec.prompt_ids), strict=True))
    yield GenerateHeader(stack.name if stack else "", stack.digest if stack else "", tuple(stages), prompt,
                         spec.sampling.seed, spec.sampling.max_new_tokens, branches)
    lagged = _lagged(spec)
    runs = [_BranchRun(host, stack, spec, branch, lagged).steps() for branch in branches]
    try:
        live = list(runs)
        while live:
            passes: list[RowPass] = []
            for run in list(live):
                for item in run:
                    if isinstance(item, RowPass):
                        passes.append(item)
                        break
                    yield from item
                else:
                    live.remove(run)
            if passes:
                yield passes
    finally:
        for run in runs:
            run.close()


def _lagged(spec: GenerateSpec) -> bool:
    """Whether tokens are reported one step late: their features or conditions need their own pass."""
    prompt_len = len(spec.prompt_ids)

    def reaches_generated(positions: Positions) -> bool:
        end = scope_interval(positions, prompt_len)[1]
        return end is None or end > prompt_len

    return spec.decompose is not None or any(reaches_generated(c.positions) for c in spec.conditions)


def eos_ids(host: HostModel) -> set[int]:
    """End-of-sequence ids: the tokenizer's and the model's generation config's."""
    ids: set[int] = set()
    configured = getattr(host.model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, Sequence):
        ids.update(int(i) for i in configured)
    if host.tokenizer.eos_token_id is not None:
        ids.add(int(host.tokenizer.eos_token_id))
    return ids


def sample(logits: Tensor, sampling: SamplingSpec, generator: torch.Generator | None) -> tuple[int, float]:
    """Pick the next token from raw logits (V,): greedy at temperature 0, else temperature, top-k, top-p.
    Returns the token and its log-probability under the raw (untempered) distribution.

    The logits are shifted so that their maximum is 0 before dividing by the temperature: every tempered score is
    then <= 0 (at worst -inf, which softmax maps to 0), so no temperature the API accepts, down to the smallest
    float32, can overflow into NaN probabilities."""
    logits = logits.float()
    if sampling.temperature == 0:
        token = logits.argmax()
    else:
        scores = (logits - logits.max()) / sampling.temperature  # (V,), max 0
        if 0 < sampling.top_k < scores.shape[0]:
            kth = scores.topk(sampling.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if sampling.top_p < 1:
            ordered, order = scores.sort(descending=True)  # (V,)
            probs = ordered.softmax(-1)
            drop = probs.cumsum(-1) - probs > sampling.top_p  # the top token always stays
            scores = scores.masked_fill(torch.empty_like(drop).scatter_(0, order, drop), float("-inf"))
        token = torch.multinomial(scores.softmax(-1), 1, generator=generator)[0]
    logprob = logits.log_softmax(-1)[token]
    token_id, value = torch.stack([token.float(), logprob]).tolist()
    return int(token_id), value


def check_finite_logits(logits: Tensor, spec: GenerateSpec, branch: Branch, position: int) -> None:
    """Non-finite next-token logits on a branch the request edits are the request's doing (a steering value too
    large for the model): a client error that says so. On an unedited branch they are a server fault.

    The check is the extremes' (NaN and ±inf propagate into them): one vectorised pass over the V logits, where
    `isfinite(logits).all()` built a (V,) mask every token (0.75 ms of CPU for Gemma 3's 262k vocabulary)."""
    if all(math.isfinite(x) for x in torch.stack(torch.aminmax(logits)).tolist()):
        return
    if branch is Branch.STEERED and (spec.interventions or spec.steering):
        raise InvalidRequest(f"the interventions made the model's next-token logits non-finite (NaN or infinity) at "
                             f"position {position}: use smaller intervention or steering values")
    raise FloatingPointError(f"non-finite logits at position {position} on the {branch.name} branch")


class _BranchRun:
    """One branch: its plan, cache, generator and text; `steps()` yields its events once per step."""

    def __init__(self, host: HostModel, stack: ServedStack | None, spec: GenerateSpec, branch: Branch,
                 lagged: bool) -> None:
        self.host, self.stack, self.spec, self.branch, self.lagged = host, stack, spec, branch, lagged
        self.prompt_len = len(spec.prompt_ids)
        self.plan = _plan(host, stack, spec, branch)
        sampling = spec.sampling
        self.generator = None
        if sampling.temperature > 0:
            self.generator = torch.Generator(device=host.device).manual_seed(sampling.seed)
        self.eos = set() if sampling.ignore_eos else eos_ids(host)
        self.text = TextStream(host.tokenizer, sampling.stop, spec.prompt_ids)
        self.cache: RowCache | None = None
        self.chunk: Chunk | None = None
        self.logits: Tensor | None = None
        self.generated = 0

    def _pass(self, ids: list[int], offset: int, *, logits: bool) -> Iterator[RowPass]:
        """Yield the pass over positions [offset, offset + len(ids)) with this branch's hooks, until it needs no
        re-run; `self.logits` then holds its next-token logits (V,) (None when not asked for)."""
        while True:
            chunk = self.plan.chunk(offset, len(ids), self.prompt_len) if self.plan else None
            writes = chunk.writes if chunk else {}
            if not logits and not writes:  # the last lagged pass with nothing to read: nothing runs
                self.logits, self.chunk = None, chunk
                return
            row = RowPass(ids, offset, self.cache, writes, need_logits=logits)
            yield row
            rerun = chunk.rerun_from() if chunk else None
            if rerun is None:
                break
            assert self.plan is not None and self.cache is None  # only the prefill spans several positions
            self.plan.forget_after(rerun)
        self.cache, self.chunk, self.logits = row.new_cache, chunk, row.logits

    def _features(self, position: int) -> tuple[StageCodes, ...]:
        decompose = self.spec.decompose
        if decompose is None or self.chunk is None:
            return ()
        out = []
        for stage in decompose.stages:
            kept = self.chunk.codes.get(stage)
            if kept is None or kept.start != position:
                continue
            always = decompose.feature_filter.get(stage, ())
            out += stage_codes(stage, kept.codes, decompose.top_k, always=always, error_norm=kept.error_norm,
                               predicted=kept.predicted)
        return tuple(out)

    def _events(self) -> list[ConditionEvent]:
        return self.plan.take_events() if self.plan else []

    def _finish(self, reason: FinishReason, trigger: ConditionEvent | None = None, stop: str = "") -> FinishEvent:
        return FinishEvent(self.branch, reason, self.prompt_len, self.generated, self.text.emitted, trigger, stop)

    def _status(self, token: int) -> tuple[FinishReason | None, str]:
        """Feed a sampled token to the text and say whether it ends the branch (before any condition)."""
        stop = self.text.add(token)
        if token in self.eos:
            return FinishReason.EOS, ""
        if stop:
            return FinishReason.STOP_STRING, stop
        if self.generated + 1 >= self.spec.sampling.max_new_tokens:
            return FinishReason.LENGTH, ""
        return None, ""

    def steps(self) -> Iterator[list[BranchEvent] | RowPass]:
        """Prefill, then one list of events per decode step (the last ends with the FinishEvent), with the
        passes to run in between; the caller fills each pass before resuming."""
        yield from self._pass(list(self.spec.prompt_ids), 0, logits=True)
        pending: list[BranchEvent] = list(self._events())
        if self.plan is not None and (trigger := self.plan.stop) is not None:
            yield [e for e in pending if e.position <= trigger.position] + [
                self._finish(FinishReason.FEATURE_CONDITION, trigger)]
            return
        while True:
            assert self.logits is not None
            position = self.prompt_len + self.generated
            check_finite_logits(self.logits, self.spec, self.branch, position)
            token, logprob = sample(self.logits, self.spec.sampling, self.generator)
            reason, stop = self._status(token)
            if self.lagged:
                yield from self._pass([token], position, logits=reason is None)
                conditions = self._events()
                trigger = self.plan.stop if self.plan else None
                if trigger is not None:
                    reason, stop = FinishReason.FEATURE_CONDITION, ""
                features = self._features(position)
            else:
                conditions, trigger, features = [], None, ()
            delta = self.text.release(final=reason is not None)
            pending += [TokenEvent(self.branch, self.generated, position, token, delta, logprob, features),
                        *conditions]
            self.generated += 1
            if reason is not None:
                yield [*pending, self._finish(reason, trigger, stop)]
                return
            yield pending
            pending = []
            if not self.lagged:
                yield from self._pass([token], position, logits=True)


def _plan(host: HostModel, stack: ServedStack | None, spec: GenerateSpec, branch: Branch) -> EditPlan | None:
    """The branch's edit plan, or None when it has nothing to hook (a plain forward pass)."""
    steered = branch is Branch.STEERED
    interventions = spec.interventions if steered else ()
    steering = spec.steering if steered else ()
    decompose = spec.decompose
    if not (interventions or steering or spec.conditions or decompose is not None):
        return None
    runtime = stack.runtime if stack is not None else None
    return EditPlan(
        runtime, branch=branch, interventions=interventions, steering=steering, conditions=spec.conditions,
        decompose=decompose.stages if decompose is not None else (),
        include_error=decompose is not None and decompose.include_error,
        predict_error=partial(predicted_error_norm, stack) if stack is not None else None,
        keep_from=len(spec.prompt_ids), device=host.device,
    )
