"""The engine worker on its own: ordering, errors, queue bound, cancellation, deadlines, OOM, shutdown.

Jobs here are plain generator functions, so no model is needed: the engine never looks at its host.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from prometheus_client import CollectorRegistry

from core.errors import DeadlineExceeded, InvalidRequest, NotReady, Overloaded
from service.config import ServerConfig
from service.engine.execution.engine import Engine, deadline_after
from service.metrics import Metrics


@pytest.fixture
def engine():
    engine = Engine(host=None, stacks={}, settings=ServerConfig(queue_size=2).engine_settings(), metrics=None)  # type: ignore[arg-type]
    yield engine
    engine.shutdown(timeout=5)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def collect(engine: Engine, fn, deadline=None) -> list:
    return [item async for item in engine.stream(fn, deadline=deadline, method="Test")]


def test_stream_yields_every_item_in_order_from_the_worker_thread(engine):
    threads = set()

    def job() -> Iterator[int]:
        for i in range(50):
            threads.add(threading.current_thread().name)
            yield i

    assert run(collect(engine, job)) == list(range(50))
    assert threads == {"featurewire-engine"}


def test_worker_runs_under_inference_mode(engine):
    assert run(engine.call(torch.is_inference_mode_enabled, deadline=None, method="Test")) is True


def test_errors_reach_the_caller_and_the_worker_survives(engine):
    def bad() -> Iterator[int]:
        yield 1
        raise InvalidRequest("nope")

    async def scenario():
        seen = []
        with pytest.raises(InvalidRequest, match="nope"):
            async for item in engine.stream(bad, deadline=None, method="Test"):
                seen.append(item)
        assert seen == [1]
        with pytest.raises(ZeroDivisionError):
            await engine.call(lambda: 1 / 0, deadline=None, method="Test")
        return await engine.call(lambda: "alive", deadline=None, method="Test")

    assert run(scenario()) == "alive"


def test_out_of_memory_becomes_overloaded_and_the_worker_survives(engine):
    closed = threading.Event()

    def oom() -> Iterator[int]:
        try:
            yield 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        finally:
            closed.set()

    async def scenario():
        with pytest.raises(Overloaded, match="out of memory while running Test"):
            await collect(engine, oom)
        return await engine.call(lambda: 42, deadline=None, method="Test")

    assert run(scenario()) == 42
    assert closed.is_set()


def _blocker(started: threading.Event, release: threading.Event):
    def job() -> str:
        started.set()
        release.wait(10)
        return "done"
    return job


def test_a_full_queue_refuses_with_its_size(engine):
    started, release = threading.Event(), threading.Event()

    async def scenario():
        running = asyncio.ensure_future(engine.call(_blocker(started, release), deadline=None, method="Test"))
        await asyncio.to_thread(started.wait, 5)
        waiting = [asyncio.ensure_future(engine.call(lambda i=i: i, deadline=None, method="Test")) for i in range(2)]
        await asyncio.sleep(0.05)
        assert engine.queue_depth == 2
        with pytest.raises(Overloaded, match=r"queue is full \(2 requests waiting\)"):
            await engine.call(lambda: None, deadline=None, method="Test")
        release.set()
        return [await running, *[await w for w in waiting]]

    assert run(scenario()) == ["done", 0, 1]


def test_closing_the_stream_stops_the_generator_within_one_step(engine):
    produced, finished = [], threading.Event()

    def endless() -> Iterator[int]:
        try:
            for i in range(10**9):
                produced.append(i)
                time.sleep(0.002)
                yield i
        finally:
            finished.set()

    async def scenario():
        stream = engine.stream(endless, deadline=None, method="Test")
        async for item in stream:
            if item == 3:
                break
        await stream.aclose()
        await asyncio.to_thread(finished.wait, 5)
        return await engine.call(lambda: "next", deadline=None, method="Test")

    assert run(scenario()) == "next"
    assert finished.is_set() and len(produced) < 50


def test_cancelling_the_consumer_task_frees_the_worker(engine):
    finished = threading.Event()

    def endless() -> Iterator[int]:
        try:
            while True:
                time.sleep(0.002)
                yield 0
        finally:
            finished.set()

    async def scenario():
        task = asyncio.ensure_future(collect(engine, endless))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.to_thread(finished.wait, 5)
        return await engine.call(lambda: "free", deadline=None, method="Test")

    assert run(scenario()) == "free"


def test_deadline_stops_a_running_job_and_closes_it(engine):
    finished = threading.Event()

    def slow() -> Iterator[int]:
        try:
            while True:
                time.sleep(0.01)
                yield 0
        finally:
            finished.set()

    with pytest.raises(DeadlineExceeded, match="deadline"):
        run(collect(engine, slow, deadline=deadline_after(0.1)))
    assert finished.wait(5)


def test_deadline_while_queued_behind_a_long_job(engine):
    started, release = threading.Event(), threading.Event()

    async def scenario():
        running = asyncio.ensure_future(engine.call(_blocker(started, release), deadline=None, method="Test"))
        await asyncio.to_thread(started.wait, 5)
        ran = threading.Event()
        with pytest.raises(DeadlineExceeded):
            await engine.call(ran.set, deadline=deadline_after(0.05), method="Test")
        assert engine.queue_depth == 0  # the expired job gave its slot back
        release.set()
        await running
        await engine.call(lambda: None, deadline=None, method="Test")
        return ran.is_set()

    assert run(scenario()) is False


def test_shutdown_finishes_queued_work_then_refuses(engine):
    started, release = threading.Event(), threading.Event()

    async def scenario():
        running = asyncio.ensure_future(engine.call(_blocker(started, release), deadline=None, method="Test"))
        queued = asyncio.ensure_future(engine.call(lambda: "queued", deadline=None, method="Test"))
        await asyncio.to_thread(started.wait, 5)
        await asyncio.sleep(0.02)
        stopper = asyncio.ensure_future(asyncio.to_thread(engine.shutdown, 5))
        await asyncio.sleep(0.02)
        with pytest.raises(NotReady, match="shutting down"):
            await engine.call(lambda: None, deadline=None, method="Test")
        release.set()
        await stopper
        return await running, await queued

    assert run(scenario()) == ("done", "queued")


def test_queue_depth_is_exported():
    metrics = Metrics(CollectorRegistry())
    engine = Engine(None, {}, ServerConfig(queue_size=7).engine_settings(), metrics)  # type: ignore[arg-type]
    try:
        text = metrics.exposition().decode()
        assert "featurewire_queue_depth 0.0" in text and "featurewire_queue_capacity 7.0" in text
    finally:
        engine.shutdown(5)


@pytest.mark.gpu
def test_a_real_cuda_out_of_memory_is_overloaded_and_the_worker_survives(engine):
    def hog() -> torch.Tensor:
        return torch.empty(1 << 50, dtype=torch.uint8, device="cuda")  # 1 PiB

    with pytest.raises(Overloaded, match="out of memory"):
        run(engine.call(hog, deadline=None, method="Test"))
    assert run(engine.call(lambda: torch.ones(2, device="cuda").sum().item(), deadline=None, method="Test")) == 2
