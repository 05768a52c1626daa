"""The engine: ONE worker thread owns the host model; asyncio callers hand it jobs through a bounded queue.

Why one thread: the model, its hooks and the CUDA stream are not safe to share, and hook state must never
leak between requests. A job is a generator function run step by step on the worker (a unary call is a
one-step generator); every item it yields is handed to the caller's event loop as soon as it exists, and
between steps the worker checks the job's cancel flag (set when the caller's stream is closed, e.g. the
client cancelled the RPC) and its deadline, then closes the generator so its `try/finally` removes hooks.

Jobs wait in a bounded FIFO and run interleaved, up to `max_batch_size` at once; Generate streams hand
their forward passes to the batcher, which runs the rows of many requests as one batch (continuous
batching: execution/scheduler.py, execution/batch.py). Other jobs advance one item per cycle between
decode steps.

Threads: every torch computation of the server runs on this worker, with its thread count set here from
`EngineSettings.threads` (0 = chosen from the machine): one OpenMP pool whose helpers stay hot between the
many small parallel regions of a decode step (execution/threads.py says why a second pool costs the
second core).

Metrics (when given): the worker reports how long each job waited before its first work, and the rows and
time of every batched forward step by phase (`_WorkerMetrics`), so queueing behind decode, slow prefills
and small batches can be told apart on /metrics.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

from core.errors import Overloaded
from service.engine.execution.batch import RowPass, run_rows
from service.engine.execution.scheduler import DECODE, END, ERROR, ITEM, PREFILL, Batcher, Job, Scheduler
from service.engine.execution.threads import available_cpus, resolve_threads

if TYPE_CHECKING:
    from core.host.host_model import HostModel
    from service.engine.contract.settings import EngineSettings
    from service.engine.stacks.served import ServedStack

log = logging.getLogger(__name__)

T = TypeVar("T")
_ITEM, _ERROR, _END = ITEM, ERROR, END
__all__ = ["Engine", "Job", "deadline_after"]


def deadline_after(seconds: float | None) -> float | None:
    """An absolute deadline on the `time.monotonic()` clock, `seconds` from now (None = no deadline)."""
    return None if seconds is None else time.monotonic() + max(0.0, seconds)


class EngineMetrics(Protocol):
    """What the engine reports, injected by the server (service.metrics.Metrics is one): the engine never
    imports prometheus or the server's metrics module."""

    def observe_queue_wait(self, method: str, seconds: float) -> None: ...
    def observe_step_rows(self, phase: str, rows: int) -> None: ...
    def observe_step_seconds(self, phase: str, seconds: float) -> None: ...
    def queue_depth_from(self, depth: Callable[[], int], capacity: int) -> None: ...


class Engine:
    """Runs model work on one worker thread. `stream`/`call` are coroutines for the server's event loop."""

    def __init__(self, host: HostModel, stacks: Mapping[str, ServedStack], settings: EngineSettings,
                 metrics: EngineMetrics | None = None) -> None:
        self.host = host
        self.stacks = dict(stacks)
        self.settings = settings
        self.metrics = metrics
        self.threads = resolve_threads(settings.threads)
        """torch intra-op threads of the worker (the settings' count, or chosen from the machine)."""
        self._scheduler = Scheduler(settings.queue_size)
        self._observer = None if metrics is None else _WorkerMetrics(metrics, getattr(host, "device", None))
        self._batcher = Batcher(self._run_rows, settings.max_batch_size, settings.max_batch_tokens, self._out_of_memory,
                                on_start=None if self._observer is None else self._observer.started)
        self._busy = threading.Event()
        self._thread = threading.Thread(target=self._work, name="featurewire-engine", daemon=True)
        if metrics is not None:
            metrics.queue_depth_from(self._scheduler.depth, settings.queue_size)
        self._thread.start()

    # -- caller side (event loop) ---------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Jobs waiting to be admitted (not counting the ones running)."""
        return self._scheduler.depth()

    @property
    def busy(self) -> bool:
        return self._busy.is_set()

    async def stream(self, fn: Callable[[], Iterator[T]], *, deadline: float | None,
                     method: str) -> AsyncIterator[T]:
        """Iterate `fn()` on the worker, yielding its items here; `deadline` is absolute (`time.monotonic()`).

        Closing or cancelling this async generator stops the job within one step. Raises Overloaded when
        the queue is full, DeadlineExceeded when the deadline passes (queued or running), and whatever the
        job raised otherwise.
        """
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def deliver(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, (kind, value))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                job.cancelled.set()

        job = Job(fn, method, deadline, deliver)
        self._scheduler.put(job)
        try:
            while True:
                timeout = None if deadline is None else deadline - time.monotonic()
                if timeout is not None and timeout <= 0:
                    raise job.deadline_error()
                try:
                    kind, value = await asyncio.wait_for(inbox.get(), timeout)
                except TimeoutError:
                    raise job.deadline_error() from None
                if kind == _ITEM:
                    yield value
                elif kind == _ERROR:
                    raise value
                else:
                    return
        finally:
            job.cancelled.set()
            self._scheduler.discard(job)

    async def call(self, fn: Callable[[], T], *, deadline: float | None, method: str) -> T:
        """Run `fn()` on the worker and return its result (a one-step job)."""

        def one() -> Iterator[T]:
            yield fn()

        stream = self.stream(one, deadline=deadline, method=method)
        try:
            async for result in stream:
                return result
        finally:
            await stream.aclose()
        raise RuntimeError("engine job ended without a result")  # pragma: no cover - one() always yields

    def shutdown(self, timeout: float | None = None) -> None:
        """Refuse new jobs, let the queued and running ones finish, and stop the worker."""
        self._scheduler.close()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- worker side ----------------------------------------------------------------------------
    def _work(self) -> None:
        torch.set_num_threads(self.threads)  # this thread's OpenMP and MKL settings (MKL's dynamic choice off)
        log.info("engine: %d torch threads (%d CPUs available)", self.threads, available_cpus())
        batcher = self._batcher
        with torch.inference_mode():
            while (jobs := self._scheduler.take(batcher.room, block=not batcher.active)) is not None:
                self._busy.set()
                try:
                    batcher.admit(jobs)
                    batcher.cycle()
                except BaseException:  # pragma: no cover - the batcher hands errors to jobs; keep the worker alive
                    log.exception("engine worker: unexpected failure outside a job")
                finally:
                    if not batcher.active:
                        if self._observer is not None:
                            self._flush_metrics()
                        self._busy.clear()
        log.debug("engine worker stopped")

    def _flush_metrics(self) -> None:
        """Idle: record the last steps' GPU times; a failure here must not stop the worker."""
        assert self._observer is not None
        try:
            self._observer.flush()
        except Exception:
            log.exception("engine worker: reading the step timings failed")

    def _run_rows(self, rows: Sequence[RowPass]) -> None:
        if self._observer is None:
            run_rows(self.host, rows)
        else:
            self._observer.step(rows, lambda: run_rows(self.host, rows))

    def _out_of_memory(self, job: Job) -> Overloaded:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning("%s ran out of memory; freed the CUDA cache and kept serving", job.method)
        return Overloaded(f"out of memory while running {job.method}; retry later or with a smaller request")


class _WorkerMetrics:
    """The worker's own view of scheduling: time queued before first work, and each forward step's rows and time.

    Everything runs on the worker thread and costs a few microseconds per job or step. On CPU a pass is finished
    when `run_rows` returns, so its wall time is its cost. On CUDA `run_rows` returns once the kernels are queued:
    timing it would show launch time, and synchronizing every step would stall the worker. There a pair of CUDA
    events brackets each step; their time is read once the GPU has passed the end event (polled at later steps,
    and waited for when the worker goes idle, when nothing is left to stall).
    """

    MAX_PENDING = 256  # steps awaiting their CUDA events; past it, wait (the worker syncs every cycle anyway)

    def __init__(self, metrics: EngineMetrics, device: torch.device | None) -> None:
        self.metrics = metrics
        self.device = device
        self.cuda = device is not None and device.type == "cuda"
        self._pending: collections.deque[tuple[str, Any, Any]] = collections.deque()  # (phase, start, end)

    def started(self, job: Job) -> None:
        """The worker is about to work on `job` for the first time: it waited since its submission."""
        self.metrics.observe_queue_wait(job.method, time.monotonic() - job.enqueued_at)

    def step(self, rows: Sequence[RowPass], run: Callable[[], None]) -> None:
        """Run one forward step over `rows` and record its rows and time by phase (rows without a cache: prefill)."""
        if not rows:
            run()
            return
        phase = PREFILL if rows[0].cache is None else DECODE
        self.metrics.observe_step_rows(phase, len(rows))
        if not self.cuda:
            started = time.perf_counter()
            try:
                run()
            finally:
                self.metrics.observe_step_seconds(phase, time.perf_counter() - started)
            return
        stream = torch.cuda.current_stream(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        try:
            run()
        finally:
            end.record(stream)
            self._pending.append((phase, start, end))
            self._collect(wait=len(self._pending) > self.MAX_PENDING)

    def flush(self) -> None:
        """Record every step still waiting for its CUDA events (blocks until the GPU has run them)."""
        self._collect(wait=True)

    def _collect(self, *, wait: bool) -> None:
        pending = self._pending
        while pending:
            phase, start, end = pending[0]
            if wait:
                end.synchronize()
            elif not end.query():
                return  # later steps ran after this one on the same stream: not done either
            pending.popleft()
            self.metrics.observe_step_seconds(phase, start.elapsed_time(end) / 1000.0)
