"""The engine: ONE worker thread owns the host model; asyncio callers hand it jobs through a bounded queue.

Why one thread: the model, its hooks and the CUDA stream are not safe to share, and hook state must never
leak between requests. A job is a generator function run step by step on the worker (a unary call is a
one-step generator); every item it yields is handed to the caller's event loop as soon as it exists, and
between steps the worker checks the job's cancel flag (set when the caller's stream is closed, e.g. the
client cancelled the RPC) and its deadline, then closes the generator so its `try/finally` removes hooks.

The scheduling policy (FIFO, one job at a time) lives in `_Scheduler`; batching later replaces it
without changing `stream`/`call`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from service.errors import DeadlineExceeded, NotReady, Overloaded

if TYPE_CHECKING:  # the engine stays importable without grpc/prometheus; Metrics is only passed in
    from service.config import ServerConfig
    from service.engine.host_model import HostModel
    from service.engine.served import ServedStack
    from service.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")
_ITEM, _ERROR, _END = "item", "error", "end"


def deadline_after(seconds: float | None) -> float | None:
    """An absolute deadline on the `time.monotonic()` clock, `seconds` from now (None = no deadline)."""
    return None if seconds is None else time.monotonic() + max(0.0, seconds)


@dataclass(eq=False)
class Job:
    """One unit of work for the worker: a generator function, where its items go, and how to stop it."""

    fn: Callable[[], Iterator[Any]]
    method: str
    deadline: float | None
    deliver: Callable[[str, Any], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def deadline_error(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"{self.method}: the deadline passed before the work finished")


class _Scheduler:
    """FIFO of waiting jobs with a hard bound; the only policy the worker knows about."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False

    def depth(self) -> int:
        return len(self._waiting)

    def put(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise NotReady("the server is shutting down; retry on another replica")
            if len(self._waiting) >= self.capacity:
                raise Overloaded(f"the engine queue is full ({self.capacity} requests waiting); retry later")
            self._waiting.append(job)
            self._cond.notify()

    def discard(self, job: Job) -> None:
        """Drop a cancelled job that has not started, so it stops taking a queue slot."""
        with self._cond, contextlib.suppress(ValueError):
            self._waiting.remove(job)

    def take(self) -> Job | None:
        """The next job; None once closed and empty (the worker then exits)."""
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            return self._waiting.popleft() if self._waiting else None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class Engine:
    """Runs model work on one worker thread. `stream`/`call` are coroutines for the server's event loop."""

    def __init__(self, host: HostModel, stacks: Mapping[str, ServedStack], config: ServerConfig,
                 metrics: Metrics | None = None) -> None:
        self.host = host
        self.stacks = dict(stacks)
        self.config = config
        self.metrics = metrics
        self._scheduler = _Scheduler(config.queue_size)
        self._busy = threading.Event()
        self._thread = threading.Thread(target=self._work, name="featurewire-engine", daemon=True)
        if metrics is not None:
            metrics.queue_depth_from(self._scheduler.depth, config.queue_size)
        self._thread.start()

    # -- caller side (event loop) ---------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Jobs waiting (not counting the one running)."""
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
        with torch.inference_mode():
            while (job := self._scheduler.take()) is not None:
                self._busy.set()
                try:
                    self._run(job)
                except BaseException:  # pragma: no cover - _run never raises; keep the worker alive anyway
                    log.exception("engine worker: unexpected failure outside a job")
                finally:
                    self._busy.clear()
        log.debug("engine worker stopped")

    def _run(self, job: Job) -> None:
        """Run one job to completion, cancellation, deadline or error; always ends with END or ERROR."""
        if job.cancelled.is_set():
            return
        if job.expired():
            job.deliver(_ERROR, job.deadline_error())
            return
        iterator: Iterator[Any] | None = None
        try:
            iterator = iter(job.fn())
            for item in iterator:
                job.deliver(_ITEM, item)
                if job.cancelled.is_set():
                    log.debug("%s cancelled by the caller", job.method)
                    return
                if job.expired():
                    job.deliver(_ERROR, job.deadline_error())
                    return
            job.deliver(_END, None)
        except torch.OutOfMemoryError:
            self._close(iterator)  # release the job's tensors and hooks before emptying the cache
            iterator = None
            job.deliver(_ERROR, self._out_of_memory(job))
        except Exception as error:  # passed to the caller; the ErrorInterceptor maps or logs it
            job.deliver(_ERROR, error)
        finally:
            self._close(iterator)

    @staticmethod
    def _close(iterator: Iterator[Any] | None) -> None:
        close = getattr(iterator, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                log.exception("closing an engine job raised")

    def _out_of_memory(self, job: Job) -> Overloaded:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning("%s ran out of memory; freed the CUDA cache and kept serving", job.method)
        return Overloaded(f"out of memory while running {job.method}; retry later or with a smaller request")
