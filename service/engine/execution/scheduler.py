"""Continuous batching on the engine's worker thread: which jobs run, and which rows share a forward pass.

Jobs wait in a bounded FIFO (`Scheduler`; full -> Overloaded, i.e. RESOURCE_EXHAUSTED). Up to
`max_batch_size` of them are active at once (`Batcher`). Every cycle the batcher

1. drops active jobs that were cancelled or whose deadline passed (so a row leaves within one step),
2. advances every job that is not waiting for a forward pass: a plain job (Decompose, Score, a unary
   call...) by one item; a stepped job (a Generate stream) until it hands out its next passes,
3. runs the waiting passes: at most one prefill forward (rows without a KV cache, oldest job first, up
   to `max_batch_size` rows and `max_batch_tokens` tokens; a longer prompt runs alone), then every
   decode row (one token each) in as few forwards as the same limits allow.

Requests thus join the running batch when their prefill is done and leave it when they finish, between
two steps. Fairness: decode steps of running streams happen every cycle, whatever prefills wait, and a
long prompt delays them by at most its own prefill once; prefills are admitted in arrival order, so
long requests cannot starve short ones nor the reverse; plain jobs get one item per cycle, interleaved.

Observability: the batcher calls `on_start(job)` when it first advances a job (the engine turns that into
the queue-wait metric) and runs every forward step through `run_rows`, which the engine times.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from core.errors import DeadlineExceeded, NotReady, Overloaded
from service.engine.execution.batch import RowPass

log = logging.getLogger(__name__)
ITEM, ERROR, END = "item", "error", "end"
PREFILL, DECODE = "prefill", "decode"  # the phases of forward steps (service.metrics.PHASES, without its import)


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


@runtime_checkable
class Stepped(Protocol):
    """A job iterator whose forward passes the batcher runs: `advance()` returns the next item, a list of
    RowPass to fill before it can go on, or None at the end (GenerationStream)."""

    def advance(self) -> Any: ...

    def close(self) -> None: ...


class Scheduler:
    """FIFO of waiting jobs with a hard bound."""

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

    def take(self, limit: int, *, block: bool) -> list[Job] | None:
        """Up to `limit` jobs, oldest first. With `block`, waits for one; then None once closed and empty."""
        with self._cond:
            while block and not self._waiting and not self._closed:
                self._cond.wait()
            if block and not self._waiting:
                return None
            return [self._waiting.popleft() for _ in range(min(limit, len(self._waiting)))]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclass(eq=False)
class _Active:
    job: Job
    iterator: Iterator[Any] | Stepped
    pending: list[RowPass] = field(default_factory=list)  # passes it waits for
    started: bool = False  # advanced at least once (on_start was called)

    @property
    def stepped(self) -> bool:
        return isinstance(self.iterator, Stepped)


RunRows = Callable[[Sequence[RowPass]], None]


class Batcher:
    """The active jobs and one scheduling cycle over them (see the module docstring)."""

    def __init__(self, run_rows: RunRows, max_batch_size: int, max_batch_tokens: int,
                 on_out_of_memory: Callable[[Job], Exception], *,
                 on_start: Callable[[Job], None] | None = None) -> None:
        self.run_rows, self.max_rows, self.max_tokens = run_rows, max_batch_size, max_batch_tokens
        self.on_out_of_memory = on_out_of_memory
        self.on_start = on_start  # called once per job, just before the worker first advances it
        self.active: list[_Active] = []

    @property
    def room(self) -> int:
        return max(0, self.max_rows - len(self.active))

    def admit(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            if job.cancelled.is_set():
                continue
            if job.expired():
                job.deliver(ERROR, job.deadline_error())
                continue
            try:
                self.active.append(_Active(job, iter(job.fn())))
            except Exception as error:
                job.deliver(ERROR, error)

    def cycle(self) -> None:
        for entry in list(self.active):
            if not self._alive(entry):
                continue
            if not entry.pending:
                self._advance(entry)
        self._run_passes()

    # -- one job ------------------------------------------------------------------------------
    def _alive(self, entry: _Active) -> bool:
        """False (and the job removed) when it was cancelled or ran past its deadline."""
        if entry.job.cancelled.is_set():
            log.debug("%s cancelled by the caller", entry.job.method)
            self._drop(entry)
            return False
        if entry.job.expired():
            self._drop(entry, entry.job.deadline_error())
            return False
        return True

    def _advance(self, entry: _Active) -> None:
        """A plain job by one item; a stepped one until it waits for passes or ends."""
        job = entry.job
        if not entry.started:
            entry.started = True
            if self.on_start is not None:
                self.on_start(job)
        try:
            while True:
                if entry.stepped:
                    item = entry.iterator.advance()  # type: ignore[union-attr]
                    if item is None:
                        self._drop(entry, None, ended=True)
                        return
                else:
                    item = next(entry.iterator)  # type: ignore[arg-type]
                if isinstance(item, list) and entry.stepped:
                    entry.pending = list(item)
                    return
                job.deliver(ITEM, item)
                if not entry.stepped or job.cancelled.is_set():
                    return
        except StopIteration:
            self._drop(entry, None, ended=True)
        except torch.OutOfMemoryError:
            self._drop(entry, self.on_out_of_memory(job))
        except Exception as error:  # passed to the caller; the ErrorInterceptor maps or logs it
            self._drop(entry, error)

    def _drop(self, entry: _Active, error: BaseException | None = None, *, ended: bool = False) -> None:
        """Remove a job: close its iterator (its `finally` runs), then tell the caller how it ended."""
        if entry in self.active:
            self.active.remove(entry)
        close = getattr(entry.iterator, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                log.exception("closing an engine job raised")
        if error is not None:
            entry.job.deliver(ERROR, error)
        elif ended:
            entry.job.deliver(END, None)

    # -- forward passes -------------------------------------------------------------------------
    def _run_passes(self) -> None:
        waiting = [(entry, row) for entry in self.active for row in entry.pending if not row.done]
        prefill = [(e, r) for e, r in waiting if r.cache is None]
        decode = [(e, r) for e, r in waiting if r.cache is not None]
        groups = self._groups(prefill)[:1] + self._groups(decode)
        for group in groups:
            self._run_group(group)
        for entry in list(self.active):
            if entry.pending and all(row.done for row in entry.pending):
                entry.pending = []

    def _groups(self, rows: list[tuple[_Active, RowPass]]) -> list[list[tuple[_Active, RowPass]]]:
        """Consecutive groups of at most max_rows rows and max_tokens tokens (a longer row runs alone)."""
        groups: list[list[tuple[_Active, RowPass]]] = []
        tokens = 0
        for entry, row in rows:
            if not groups or len(groups[-1]) >= self.max_rows or tokens + row.tokens > self.max_tokens:
                groups.append([])
                tokens = 0
            groups[-1].append((entry, row))
            tokens += row.tokens
        return groups

    def _run_group(self, group: list[tuple[_Active, RowPass]]) -> None:
        group = [(entry, row) for entry, row in group if entry in self.active]  # not those dropped meanwhile
        if not group:
            return
        entries = list(dict.fromkeys(entry for entry, _ in group))
        try:
            self.run_rows([row for _, row in group])
        except torch.OutOfMemoryError:
            for entry in entries:
                self._drop(entry, self.on_out_of_memory(entry.job))
            return
        except Exception as error:
            if len(entries) == 1:
                self._drop(entries[0], error)
                return
            log.warning("a batched pass failed (%s); running its requests one by one", type(error).__name__)
            for entry in entries:
                self._run_group([(e, r) for e, r in group if e is entry])
            return
        for _, row in group:
            row.done = True
