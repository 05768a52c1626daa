"""How many CPU threads the engine's torch work uses, and keeping that work on one OpenMP thread pool.

Why this matters on CPU: torch's intra-op parallelism is OpenMP (libgomp), and libgomp keeps one pool of
helper threads per thread that ever started a parallel region. After each region a pool's helpers spin for
a while (300k iterations) so the next region starts at once; but when libgomp manages more threads than the
process has CPUs (two pools of two threads on a 2-core machine), every pool spins only 1k iterations and
then sleeps, so each of the hundreds of small parallel regions of a decode step waits for its helpers to be
woken, and the second core does almost nothing (measured: docs/benchmarks.md, "Steered generation and
threads"). The server therefore runs every torch computation on the engine's worker thread, loads the model
and stacks on a thread that exits (freeing its pool), and sets the worker's thread count explicitly
(`torch.set_num_threads` in that thread also turns MKL's dynamic thread choice off, as a notebook's
`torch.set_num_threads` does).

The default count is what this process may really use: torch's own default (OMP_NUM_THREADS, else the
cores) capped by the CPU affinity mask and the cgroup CPU quota (a container limited to 2 CPUs on a 64-core
node must not start 64 threads).
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")

_CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def cgroup_cpu_limit(v2: Path = _CGROUP_V2, v1: tuple[Path, Path] = _CGROUP_V1) -> float | None:
    """CPUs the cgroup quota allows (e.g. 1.5), None without a quota or where it cannot be read."""
    try:
        quota, period = v2.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us, period_us = (int(path.read_text()) for path in v1)
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def available_cpus() -> int:
    """CPUs this process may run on: the affinity mask, capped by the cgroup quota (rounded up), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def default_threads() -> int:
    """torch's default intra-op thread count here (it honours OMP_NUM_THREADS), capped by `available_cpus()`."""
    return max(1, min(torch.get_num_threads(), available_cpus()))


def resolve_threads(requested: int) -> int:
    """`requested` when positive, else `default_threads()`."""
    if requested < 0:
        raise ValueError(f"threads must be 0 (chosen from the machine) or a positive count, got {requested}")
    return requested or default_threads()


async def in_transient_thread(fn: Callable[[], T]) -> T:
    """Run `fn()` on a new thread that exits when it returns, and await its result.

    For torch work outside the engine (loading the model and stacks): a thread that ran an OpenMP region
    keeps a pool of helper threads as long as it lives (asyncio.to_thread's executor threads live on), and
    one pool too many makes libgomp stop spinning in every pool (see the module docstring)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = fn()
        except BaseException as error:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, None, error)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name="featurewire-loader", daemon=True).start()
    return await done  # cancelled (a signal during startup): the thread finishes on its own, unobserved
