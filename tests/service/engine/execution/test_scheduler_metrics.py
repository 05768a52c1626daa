"""The scheduler metrics measure what the worker really did: rows and time of every batched forward step by
phase, and how long each job waited before the worker first worked on it.

Real jobs on the tiny Gemma go through the engine's worker thread; the registry is read after the engine
has shut down (its worker joined), so every observation is in.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from prometheus_client import CollectorRegistry

from core.config import ModelConfig
from core.errors import Overloaded
from core.host.host_model import HostModel
from core.host.loading import load_host_model
from service.config import ServerConfig
from service.engine.contract.specs import DecomposeSpec, GenerateSpec, SamplingSpec
from service.engine.execution.batch import RowPass
from service.engine.execution.engine import Engine, _WorkerMetrics
from service.engine.execution.scheduler import DECODE, ITEM, PREFILL, Batcher, Job
from service.engine.operations.decompose import decompose_events
from service.engine.operations.generation import GenerationStream
from service.engine.stacks.served import ServedStack, load_served_stack
from service.metrics import PHASES, Metrics
from tests.service.engine.tiny_stacks import one_thread, write_tiny_stack

TEXTS = ("The quick brown fox", "def f(x):\n    return x", "In the beginning the universe was created.")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls on one thread: on a shared machine two torch threads spin-wait on each other."""
    with one_thread():
        yield


@pytest.fixture(scope="module")
def stack(tiny_gemma, tmp_path_factory) -> ServedStack:
    root = write_tiny_stack(tiny_gemma, tmp_path_factory.mktemp("scheduler-metrics") / "stack")
    return load_served_stack(root, tiny_gemma, self_check=False)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def spec(host: HostModel, text: str, tokens: int) -> GenerateSpec:
    ids = tuple(host.encode(text)[0].tolist())
    return GenerateSpec("", ids, SamplingSpec(max_new_tokens=tokens, ignore_eos=True))


class _Closing(GenerationStream):
    """A Generate stream that notes, on the worker's clock, when the batcher closes it (frees its batch slot)."""

    def __init__(self, host: HostModel, spec: GenerateSpec, closed: list[float]) -> None:
        super().__init__(host, None, spec)
        self._closed = closed

    def close(self) -> None:
        self._closed.append(time.monotonic())
        super().close()


async def _generate(engine: Engine, fn) -> list:
    return [event async for event in engine.stream(fn, deadline=None, method="Generate")]


def test_batched_generations_record_rows_step_times_and_the_time_they_were_held(tiny_gemma):
    """The worker is held by a job while three generations queue; they then prefill as one step of 3 rows
    and decode in steps of 3 rows, and each recorded a queue wait of at least the time it was held."""
    metrics = Metrics(CollectorRegistry())
    engine = Engine(tiny_gemma, {}, ServerConfig(max_batch_size=4).engine_settings(), metrics)
    started, release, held = threading.Event(), threading.Event(), 0.3

    def hold() -> str:
        started.set()
        release.wait(30)
        return "held"

    async def scenario() -> list:
        holder = asyncio.ensure_future(engine.call(hold, deadline=None, method="Test"))
        while not started.is_set():
            await asyncio.sleep(0.001)
        gens = [asyncio.ensure_future(_generate(engine, lambda t=t: GenerationStream(tiny_gemma, None,
                                                                                       spec(tiny_gemma, t, 12))))
                for t in TEXTS]
        while engine.queue_depth < len(TEXTS):
            await asyncio.sleep(0.001)
        await asyncio.sleep(held)
        release.set()
        assert await holder == "held"
        return await asyncio.gather(*gens)

    try:
        results = asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        engine.shutdown(10)
    assert all(len(events) > 12 for events in results)

    prefill, decode = {"phase": "prefill"}, {"phase": "decode"}
    assert sample(metrics, "featurewire_step_rows_count", **prefill) == 1  # the three prompts in one step
    assert sample(metrics, "featurewire_step_rows_sum", **prefill) == len(TEXTS)
    steps = sample(metrics, "featurewire_step_rows_count", **decode)
    assert steps >= 10  # 12 tokens: the first from the prefill, then one decode step each
    assert sample(metrics, "featurewire_step_rows_bucket", le="2.0", **decode) == 0  # every step had all 3 rows
    assert sample(metrics, "featurewire_step_rows_sum", **decode) == len(TEXTS) * steps
    assert sample(metrics, "featurewire_step_duration_seconds_count", **prefill) == 1
    assert sample(metrics, "featurewire_step_duration_seconds_sum", **prefill) > 0
    assert sample(metrics, "featurewire_step_duration_seconds_count", **decode) == steps
    assert sample(metrics, "featurewire_step_duration_seconds_sum", **decode) > 0

    generate = {"method": "Generate"}
    assert sample(metrics, "featurewire_queue_wait_seconds_count", **generate) == len(TEXTS)
    assert sample(metrics, "featurewire_queue_wait_seconds_bucket", le="0.25", **generate) == 0  # all waited > 0.3 s
    assert sample(metrics, "featurewire_queue_wait_seconds_sum", **generate) >= len(TEXTS) * held
    assert sample(metrics, "featurewire_queue_wait_seconds_count", method="other") == 1  # "Test" is no method


def test_a_decompose_queued_behind_decoding_rows_records_its_wait(tiny_gemma, stack):
    """With the batch full of generations, a Decompose waits until one of them ends: its recorded wait covers
    at least the time from its submission until that generation's slot was freed."""
    metrics = Metrics(CollectorRegistry())
    engine = Engine(tiny_gemma, {stack.name: stack}, ServerConfig(max_batch_size=2).engine_settings(), metrics)
    closed: list[float] = []
    ids = tuple(tiny_gemma.encode(TEXTS[2])[0].tolist())
    decompose = DecomposeSpec(stack.name, ids, (0,), top_k=3)

    async def scenario() -> tuple[float, list]:
        gens = [engine.stream(lambda t=t: _Closing(tiny_gemma, spec(tiny_gemma, t, 150), closed), deadline=None,
                              method="Generate") for t in TEXTS[:2]]
        for gen in gens:  # both admitted (each sent its header): the batch is full
            await anext(gen)
        rest = [asyncio.ensure_future(_drain(gen)) for gen in gens]
        chunks = asyncio.ensure_future(_collect(engine.stream(lambda: decompose_events(tiny_gemma, stack, decompose),
                                                              deadline=None, method="Decompose")))
        while engine.queue_depth < 1:
            await asyncio.sleep(0.001)
        queued_by = time.monotonic()  # the Decompose was submitted before this
        await asyncio.gather(*rest)
        return queued_by, await chunks

    try:
        queued_by, chunks = asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        engine.shutdown(10)
    assert chunks and len(closed) == 2
    decompose_labels = {"method": "Decompose"}
    assert sample(metrics, "featurewire_queue_wait_seconds_count", **decompose_labels) == 1
    waited = sample(metrics, "featurewire_queue_wait_seconds_sum", **decompose_labels)
    assert min(closed) > queued_by  # it really was queued while both generations decoded
    assert waited >= min(closed) - queued_by > 0
    decode = {"phase": "decode"}
    full = sample(metrics, "featurewire_step_rows_count", **decode) - sample(
        metrics, "featurewire_step_rows_bucket", le="1.0", **decode)
    assert full >= 100  # the two rows decoded together while the Decompose waited


async def _drain(stream) -> None:
    async for _ in stream:
        pass


async def _collect(stream) -> list:
    return [item async for item in stream]


def test_an_engine_without_metrics_batches_as_before(tiny_gemma):
    engine = Engine(tiny_gemma, {}, ServerConfig(max_batch_size=2).engine_settings(), None)

    async def scenario() -> list:
        return await asyncio.gather(*(_generate(engine, lambda t=t: GenerationStream(tiny_gemma, None,
                                                                                      spec(tiny_gemma, t, 4)))
                                      for t in TEXTS[:2]))

    try:
        results = asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        engine.shutdown(10)
    assert [len(events) for events in results] == [len(results[0])] * 2 and len(results[0]) > 4


# ------------------------------------------------------------------------------------ the parts on their own


def test_the_engine_phases_are_the_metric_label_values():
    assert (PREFILL, DECODE) == PHASES  # the engine names them without importing service.metrics


def test_on_start_runs_once_per_job_just_before_its_first_item():
    calls: list[tuple[str, object]] = []

    def items() -> Iterator[int]:
        calls.append(("work", None))
        yield from (1, 2, 3)

    job = Job(items, "Score", None, lambda kind, value: calls.append((kind, value)))
    gone = Job(items, "Score", None, lambda kind, value: calls.append((kind, value)))
    batcher = Batcher(lambda rows: None, 4, 64, lambda job: Overloaded("oom"),
                      on_start=lambda j: calls.append(("start", j)))
    batcher.admit([job, gone])
    gone.cancelled.set()  # cancelled before the worker touched it: it never started
    while batcher.active:
        batcher.cycle()
    assert calls[:3] == [("start", job), ("work", None), (ITEM, 1)]
    assert [c for c in calls if c[0] == "start"] == [("start", job)]


class _FakeEvent:
    """torch.cuda.Event on a fake GPU clock (ms): done once the test says the GPU got there."""

    now = 0.0

    def __init__(self, enable_timing: bool = False) -> None:
        self.at: float | None = None
        self.done = False

    def record(self, stream: object = None) -> None:
        self.at = _FakeEvent.now

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True

    def elapsed_time(self, end: _FakeEvent) -> float:
        assert self.at is not None and end.at is not None and end.done
        return end.at - self.at


def test_cuda_step_times_are_read_from_events_once_done_without_waiting(monkeypatch):
    """On CUDA a step's time is recorded only when its end event has completed (polled at the next step),
    and flush() waits for the rest; rows are recorded at once."""
    events: list[_FakeEvent] = []

    def event(enable_timing: bool = False) -> _FakeEvent:
        events.append(_FakeEvent(enable_timing))
        return events[-1]

    monkeypatch.setattr(torch.cuda, "Event", event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    metrics = Metrics(CollectorRegistry())
    timer = _WorkerMetrics(metrics, torch.device("cuda"))

    def pass_of(ms: float):
        def run() -> None:
            _FakeEvent.now += ms
        return run

    prefill = [RowPass((1, 2, 3), 0, None), RowPass((4,), 0, None)]
    decode = [RowPass((5,), 3, object())]  # type: ignore[arg-type]  # any cache makes it a decode row
    timer.step(prefill, pass_of(40.0))
    assert sample(metrics, "featurewire_step_rows_sum", phase="prefill") == 2
    assert sample(metrics, "featurewire_step_duration_seconds_count", phase="prefill") == 0  # still on the GPU
    events[1].done = True  # the GPU passed the prefill's end event
    timer.step(decode, pass_of(5.0))
    assert sample(metrics, "featurewire_step_duration_seconds_sum", phase="prefill") == pytest.approx(0.040)
    assert sample(metrics, "featurewire_step_duration_seconds_count", phase="decode") == 0
    timer.flush()
    assert sample(metrics, "featurewire_step_duration_seconds_sum", phase="decode") == pytest.approx(0.005)
    assert sample(metrics, "featurewire_step_rows_count", phase="decode") == 1


@pytest.mark.gpu
def test_step_times_on_a_real_gpu():
    host = load_host_model(ModelConfig(name="tiny-random", device="cuda"))
    metrics = Metrics(CollectorRegistry())
    engine = Engine(host, {}, ServerConfig(max_batch_size=4).engine_settings(), metrics)

    async def scenario() -> list:
        return await asyncio.gather(*(_generate(engine, lambda t=t: GenerationStream(host, None, spec(host, t, 8)))
                                      for t in TEXTS))

    try:
        asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        engine.shutdown(10)  # the worker went idle first: every step's events were read
    for phase in ("prefill", "decode"):
        count = sample(metrics, "featurewire_step_rows_count", phase=phase)
        assert count > 0 and sample(metrics, "featurewire_step_duration_seconds_count", phase=phase) == count
        assert sample(metrics, "featurewire_step_duration_seconds_sum", phase=phase) > 0
