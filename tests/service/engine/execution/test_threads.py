"""The engine's thread count (chosen from the machine, or set) and the transient loader thread."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
import torch

from service.config import ServerConfig
from service.engine.contract.settings import EngineSettings
from service.engine.execution import threads
from service.engine.execution.engine import Engine


def test_cgroup_v2_quota_and_no_quota(tmp_path):
    v2 = tmp_path / "cpu.max"
    v2.write_text("150000 100000\n")
    assert threads.cgroup_cpu_limit(v2, (tmp_path / "no", tmp_path / "no")) == 1.5
    v2.write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(v2, (tmp_path / "no", tmp_path / "no")) is None


def test_cgroup_v1_quota_and_unlimited(tmp_path):
    quota, period = tmp_path / "cpu.cfs_quota_us", tmp_path / "cpu.cfs_period_us"
    quota.write_text("300000\n")
    period.write_text("100000\n")
    assert threads.cgroup_cpu_limit(tmp_path / "absent", (quota, period)) == 3.0
    quota.write_text("-1\n")
    assert threads.cgroup_cpu_limit(tmp_path / "absent", (quota, period)) is None
    assert threads.cgroup_cpu_limit(tmp_path / "absent", (tmp_path / "a", tmp_path / "b")) is None


def test_available_cpus_is_capped_by_the_quota_rounded_up(monkeypatch):
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 0.5)
    assert threads.available_cpus() == 1
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert threads.available_cpus() == len(os.sched_getaffinity(0))


def test_default_follows_torch_and_the_cpus(monkeypatch):
    monkeypatch.setattr(threads, "available_cpus", lambda: 3)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)  # e.g. torch counting a 64-core node's cores
    assert threads.default_threads() == 3
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # OMP_NUM_THREADS=1
    assert threads.default_threads() == 1
    assert threads.resolve_threads(0) == 1
    assert threads.resolve_threads(5) == 5
    with pytest.raises(ValueError, match="threads must be 0 .* or a positive count, got -1"):
        threads.resolve_threads(-1)


def test_the_config_and_the_environment_set_the_count():
    assert ServerConfig.from_env({"FEATUREWIRE_THREADS": "3"}).engine_settings().threads == 3
    assert ServerConfig().engine_settings().threads == 0
    with pytest.raises(ValueError, match="FEATUREWIRE_THREADS: threads must be 0"):
        ServerConfig.from_env({"FEATUREWIRE_THREADS": "-2"})
    with pytest.raises(ValueError, match="FEATUREWIRE_THREADS must be an integer"):
        ServerConfig.from_env({"FEATUREWIRE_THREADS": "two"})
    with pytest.raises(ValueError, match="threads must be 0"):
        EngineSettings(ServerConfig().limits(), threads=-1)


@pytest.mark.parametrize("count", [1, 2])
def test_the_worker_runs_torch_at_the_settings_count(count):
    before = torch.get_num_threads()
    engine = Engine(None, {}, ServerConfig(threads=count).engine_settings(), None)  # type: ignore[arg-type]
    try:
        seen = asyncio.run(engine.call(torch.get_num_threads, deadline=None, method="Test"))
    finally:
        engine.shutdown(timeout=5)
        torch.set_num_threads(before)  # the count is process-wide for threads started later
    assert engine.threads == count and seen == count


def test_transient_thread_returns_raises_and_exits():
    names: list[str] = []

    def work() -> int:
        names.append(threading.current_thread().name)
        return 41 + 1

    def fail() -> None:
        raise ValueError("no model here")

    assert asyncio.run(threads.in_transient_thread(work)) == 42
    with pytest.raises(ValueError, match="no model here"):
        asyncio.run(threads.in_transient_thread(fail))
    assert names == ["featurewire-loader"]
    for thread in threading.enumerate():  # it has handed its result over; let it finish exiting
        if thread.name == "featurewire-loader":
            thread.join(5)
    assert not [t for t in threading.enumerate() if t.name == "featurewire-loader"]
