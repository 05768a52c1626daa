"""Continuous batching: a request's output is the same alone and inside a batch of other requests (other
lengths, interventions, conditions, decompositions, branches), rows never see each other's edits, and
requests join, leave and are cancelled between steps.

The batcher is driven here on the test thread (admit, cycle) so the batch compositions are known; the
engine tests at the end go through the worker thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence

import pytest
import torch

from core.errors import Overloaded
from core.host.host_model import SamplingParams
from service.config import ServerConfig
from service.engine.contract.specs import (
    Action,
    Branch,
    Comparison,
    ConditionEvent,
    ConditionSpec,
    DecomposeSpec,
    FinishEvent,
    GenerateSpec,
    InterventionSpec,
    Op,
    SamplingSpec,
    SteeringSpec,
    TokenEvent,
)
from service.engine.execution.batch import RowPass, run_rows
from service.engine.execution.engine import Engine
from service.engine.execution.scheduler import END, ERROR, ITEM, Batcher, Job
from service.engine.operations.generation import generate_events
from service.engine.stacks.served import ServedStack, load_served_stack
from tests.service.engine.tiny_stacks import one_thread, write_tiny_stack

TEXTS = ("The quick brown fox", "def f(x):\n    return x", "A", "In the beginning the universe was created. "
         "This has made a lot of people very angry and been widely regarded as a bad move.")
GREEDY = SamplingSpec(max_new_tokens=12, ignore_eos=True)
SAMPLED = SamplingSpec(max_new_tokens=9, temperature=1.0, top_k=40, top_p=0.9, seed=11, ignore_eos=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls on one thread: on a shared machine two torch threads spin-wait on each other."""
    with one_thread():
        yield


class Driver:
    """A Batcher on the test thread; records every job's items and the rows of every forward pass."""

    def __init__(self, host, max_rows: int = 16, max_tokens: int = 4096, broken: str = "") -> None:
        self.host, self.passes, self.broken = host, [], broken
        self.batcher = Batcher(self._run, max_rows, max_tokens, lambda job: Overloaded("oom"))

    def _run(self, rows: Sequence[RowPass]) -> None:
        self.passes.append(len(rows))
        for row in rows:  # a failing edit in the rows that write at `broken`
            if self.broken in row.writes:
                row.writes[self.broken] = _fail
        run_rows(self.host, rows)

    def job(self, stack, spec: GenerateSpec) -> tuple[Job, list]:
        out: list = []
        job = Job(lambda: generate_events(self.host, stack, spec), "Generate", None,
                  lambda kind, value: out.append((kind, value)))
        return job, out

    def run(self, *jobs: Job, cycles: int | None = None) -> None:
        self.batcher.admit(jobs)
        n = 0
        while self.batcher.active and (cycles is None or n < cycles):
            self.batcher.cycle()
            n += 1


def _fail(h: torch.Tensor) -> torch.Tensor:
    raise ValueError("boom")


def events(out: list) -> list:
    assert out[-1] == (END, None), out[-1]
    return [value for kind, value in out if kind == ITEM]


def summary(evs: list) -> list:
    """Per branch, per token: id and position, plus conditions and finishes; logprobs and features apart."""
    return [(e.branch, e.position, e.token_id) if isinstance(e, TokenEvent) else e for e in evs
            if isinstance(e, TokenEvent | ConditionEvent | FinishEvent)]


def assert_same(batched: list, alone: list) -> None:
    """Tokens, conditions and finishes identical; log-probabilities and features equal up to rounding."""
    assert summary(batched) == summary(alone)
    pairs = [(b, a) for b, a in zip(batched, alone, strict=True) if isinstance(a, TokenEvent)]
    for b, a in pairs:
        assert b.logprob == pytest.approx(a.logprob, abs=1e-4)
        assert [(c.stage, c.ids, c.l0) for c in b.features] == [(c.stage, c.ids, c.l0) for c in a.features]
        for cb, ca in zip(b.features, a.features, strict=True):
            assert cb.values == pytest.approx(ca.values, abs=1e-4)
            if ca.error_norm is not None:
                assert cb.error_norm == pytest.approx(ca.error_norm, rel=1e-4, abs=1e-5)


def prompt(host, text: str) -> tuple[int, ...]:
    return tuple(host.encode(text)[0].tolist())


@pytest.fixture(scope="module")
def stack(tiny_gemma, tmp_path_factory) -> ServedStack:
    """Four stages: TopK, SA-GSAE (signed), TopK, and a residual (ReSAE) stage reading stage 0."""
    root = write_tiny_stack(tiny_gemma, tmp_path_factory.mktemp("batching") / "stack")
    return load_served_stack(root, tiny_gemma, self_check=False)


def mixed_specs(host, stack: ServedStack | None) -> list[GenerateSpec]:
    """Requests that differ in everything a row can differ in."""
    name = stack.name if stack else ""
    d = host.hookpoints.d_model
    steer = SteeringSpec("blocks.1.hook_resid_post", tuple(0.5 * ((i % 7) - 3) for i in range(d)), 3.0)
    specs = [
        GenerateSpec(name, prompt(host, TEXTS[0]), GREEDY),
        GenerateSpec(name, prompt(host, TEXTS[1]), SAMPLED, steering=(steer,)),
        GenerateSpec(name, prompt(host, TEXTS[2]), dataclasses.replace(GREEDY, max_new_tokens=3)),
        GenerateSpec(name, prompt(host, TEXTS[3]), dataclasses.replace(SAMPLED, seed=5, max_new_tokens=20)),
    ]
    if stack is None:
        return specs
    return specs + [
        GenerateSpec(name, prompt(host, TEXTS[0]), GREEDY, with_default=True,
                     interventions=(InterventionSpec(0, 5, Op.SET, 30.0), InterventionSpec(3, 7, Op.ADD, 4.0))),
        GenerateSpec(name, prompt(host, TEXTS[1]), SAMPLED, interventions=(InterventionSpec(1, 2, Op.CLAMP, lo=-1.0,
                                                                                           hi=1.0),),
                     decompose=DecomposeSpec(name, (), (0, 1, 3), top_k=4, include_error=True)),
        GenerateSpec(name, prompt(host, TEXTS[3]), GREEDY, decompose=DecomposeSpec(name, (), (2,), top_k=3),
                     conditions=(ConditionSpec("on", 2, 3, Comparison.BELOW, 1e9, Action.ENABLE_INTERVENTIONS),),
                     interventions=(InterventionSpec(0, 9, Op.SCALE, 0.0, condition_id="on"),)),
    ]


def test_every_request_is_the_same_alone_and_in_a_mixed_batch(tiny_host):
    specs = mixed_specs(tiny_host, None)
    alone = [list(generate_events(tiny_host, None, spec)) for spec in specs]
    driver = Driver(tiny_host)
    jobs = [driver.job(None, spec) for spec in specs]
    driver.run(*(job for job, _ in jobs))
    for (_, out), expected in zip(jobs, alone, strict=True):
        assert_same(events(out), expected)
    assert max(driver.passes) == len(specs)  # the prefills ran together, and so did the decode steps


def test_edits_conditions_and_decompositions_stay_in_their_rows(tiny_gemma, stack):
    specs = mixed_specs(tiny_gemma, stack)
    alone = [list(generate_events(tiny_gemma, stack, spec)) for spec in specs]
    driver = Driver(tiny_gemma)
    jobs = [driver.job(stack, spec) for spec in specs]
    driver.run(*(job for job, _ in jobs))
    for (_, out), expected in zip(jobs, alone, strict=True):
        assert_same(events(out), expected)
    assert max(driver.passes) == len(specs) + 1  # with the DEFAULT branch as its own row
    branches = [e for e in events(jobs[4][1]) if isinstance(e, TokenEvent)]
    assert [e.token_id for e in branches if e.branch is Branch.DEFAULT] != [
        e.token_id for e in branches if e.branch is Branch.STEERED]  # the edit did act, in its own row only
    assert any(e.features for e in events(jobs[5][1]) if isinstance(e, TokenEvent))


def test_a_long_prompt_past_the_sliding_window_matches_hf_generate(tiny_gemma):
    long = prompt(tiny_gemma, TEXTS[3] * 2)
    assert len(long) > tiny_gemma.model.config.sliding_window
    expected, _ = tiny_gemma.generate(torch.tensor([long]), SamplingParams(max_new_tokens=10))
    driver = Driver(tiny_gemma)
    short, short_out = driver.job(None, GenerateSpec("", prompt(tiny_gemma, "A"), GREEDY))
    job, out = driver.job(None, GenerateSpec("", long, SamplingSpec(max_new_tokens=10, ignore_eos=True)))
    driver.run(short, job)
    assert [e.token_id for e in events(out) if isinstance(e, TokenEvent)] == expected[0].tolist()


def test_requests_join_and_leave_between_steps(tiny_gemma, stack):
    first = GenerateSpec(stack.name, prompt(tiny_gemma, TEXTS[1]), dataclasses.replace(GREEDY, max_new_tokens=30),
                         interventions=(InterventionSpec(0, 5, Op.SET, 20.0),))
    later = GenerateSpec(stack.name, prompt(tiny_gemma, TEXTS[3]), SAMPLED,
                         decompose=DecomposeSpec(stack.name, (), (0, 3), top_k=3))
    alone = [list(generate_events(tiny_gemma, stack, spec)) for spec in (first, later)]
    driver = Driver(tiny_gemma)
    (job1, out1), (job2, out2) = driver.job(stack, first), driver.job(stack, later)
    driver.run(job1, cycles=6)  # the first request decodes alone for a while...
    assert driver.passes and set(driver.passes) == {1}
    driver.run(job2)  # ...the second joins, leaves after 9 tokens, and the first goes on alone
    assert 2 in driver.passes and driver.passes[-1] == 1
    assert_same(events(out1), alone[0])
    assert_same(events(out2), alone[1])


def test_a_cancelled_row_leaves_within_one_step_and_the_others_go_on(tiny_gemma, stack):
    specs = mixed_specs(tiny_gemma, stack)[:2]
    long = dataclasses.replace(specs[0], sampling=dataclasses.replace(GREEDY, max_new_tokens=100))
    driver = Driver(tiny_gemma)
    (victim, victim_out), (other, other_out) = driver.job(stack, long), driver.job(stack, specs[1])
    driver.run(victim, other, cycles=4)
    victim.cancelled.set()
    seen = len(victim_out)
    driver.batcher.cycle()
    assert [entry.job for entry in driver.batcher.active] == [other]
    assert len(victim_out) == seen  # nothing more was produced or delivered for it
    driver.run()
    assert_same(events(other_out), list(generate_events(tiny_gemma, stack, specs[1])))


def test_the_token_budget_splits_prefills_and_runs_a_long_prompt_alone(tiny_gemma):
    specs = [GenerateSpec("", prompt(tiny_gemma, text), dataclasses.replace(GREEDY, max_new_tokens=2),
                          with_default=i == 2) for i, text in enumerate(TEXTS)]  # one request of two rows
    budget = max(len(s.prompt_ids) for s in specs) - 1  # the longest prompt exceeds it
    driver = Driver(tiny_gemma, max_rows=2, max_tokens=budget)
    jobs = [driver.job(None, spec) for spec in specs]
    driver.run(*(job for job, _ in jobs))
    assert max(driver.passes) <= 2
    for (_, out), spec in zip(jobs, specs, strict=True):
        assert_same(events(out), list(generate_events(tiny_gemma, None, spec)))


# ------------------------------------------------------------------------------------ through the engine


def _engine(host, stack, **config) -> Engine:
    return Engine(host, {stack.name: stack} if stack else {}, ServerConfig(**config).engine_settings())


async def _collect(engine: Engine, host, stack, spec: GenerateSpec) -> list:
    stream = engine.stream(lambda: generate_events(host, stack, spec), deadline=None, method="Generate")
    return [event async for event in stream]


def test_concurrent_streams_through_the_engine_match_their_lone_runs(tiny_gemma, stack):
    specs = mixed_specs(tiny_gemma, stack)
    engine = _engine(tiny_gemma, stack)
    try:
        async def scenario():
            return await asyncio.gather(*(_collect(engine, tiny_gemma, stack, spec) for spec in specs))

        results = asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        engine.shutdown(10)
    for got, spec in zip(results, specs, strict=True):
        assert_same(got, list(generate_events(tiny_gemma, stack, spec)))


def _long(host) -> GenerateSpec:
    return GenerateSpec("", prompt(host, TEXTS[0]), SamplingSpec(max_new_tokens=400, ignore_eos=True))


def test_a_unary_call_runs_between_decode_steps_of_a_running_stream(tiny_gemma):
    engine = _engine(tiny_gemma, None, max_batch_size=2)
    spec = _long(tiny_gemma)

    async def scenario():
        stream = engine.stream(lambda: generate_events(tiny_gemma, None, spec), deadline=None, method="Generate")
        await anext(stream)  # the header: the generation is running
        result = await engine.call(lambda: "between steps", deadline=None, method="Test")
        rest = [event async for event in stream]
        return result, rest

    try:
        result, rest = asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        engine.shutdown(10)
    assert result == "between steps"
    assert len([e for e in rest if isinstance(e, TokenEvent)]) > 200  # the stream had far from finished


def test_a_full_queue_refuses_while_the_batch_is_full(tiny_gemma):
    engine = _engine(tiny_gemma, None, max_batch_size=2, queue_size=1)
    spec = _long(tiny_gemma)

    async def scenario():
        streams = [engine.stream(lambda: generate_events(tiny_gemma, None, spec), deadline=None, method="Generate")
                   for _ in range(2)]
        for stream in streams:  # both admitted: each has produced its header
            await anext(stream)
        waiting = asyncio.ensure_future(engine.call(lambda: "waited", deadline=None, method="Test"))
        while engine.queue_depth < 1:
            await asyncio.sleep(0.001)
        with pytest.raises(Overloaded, match=r"queue is full \(1 requests waiting\)"):
            await engine.call(lambda: None, deadline=None, method="Test")
        for stream in streams:
            await stream.aclose()  # cancelled: both rows leave, the waiting call is admitted
        return await waiting

    try:
        assert asyncio.run(asyncio.wait_for(scenario(), 120)) == "waited"
    finally:
        engine.shutdown(10)


def test_queue_full_maps_to_resource_exhausted():
    import grpc

    from service.status import to_status

    assert to_status(Overloaded("full"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_an_error_in_one_row_fails_only_its_request(tiny_gemma):
    good = GenerateSpec("", prompt(tiny_gemma, TEXTS[0]), dataclasses.replace(GREEDY, max_new_tokens=4))
    bad = GenerateSpec("", prompt(tiny_gemma, TEXTS[1]), GREEDY, steering=(
        SteeringSpec("blocks.1.hook_resid_post", (1.0,) * tiny_gemma.hookpoints.d_model),))
    driver = Driver(tiny_gemma, broken="blocks.1.hook_resid_post")
    (job_good, out_good), (job_bad, out_bad) = driver.job(None, good), driver.job(None, bad)
    driver.run(job_good, job_bad)
    assert 2 in driver.passes  # the failed batch, then each request alone
    assert out_bad[-1][0] == ERROR and "boom" in str(out_bad[-1][1])
    assert_same(events(out_good), list(generate_events(tiny_gemma, None, good)))


def test_batch_limits_come_from_the_environment_and_are_validated():
    config = ServerConfig.from_env({"FEATUREWIRE_MAX_BATCH_SIZE": "4", "FEATUREWIRE_MAX_BATCH_TOKENS": "512"})
    assert (config.max_batch_size, config.max_batch_tokens) == (4, 512)
    assert ServerConfig.from_env({"FEATUREWIRE_MAX_BATCH_SIZE": "4"}, max_batch_size=2).max_batch_size == 2
    with pytest.raises(ValueError, match="FEATUREWIRE_MAX_BATCH_TOKENS"):
        ServerConfig.from_env({"FEATUREWIRE_MAX_BATCH_TOKENS": "0"})
