"""Faults, black-box through gRPC: a client that vanishes mid-stream, SIGTERM while a stream is in flight (a real
server process), out-of-memory inside the engine, and a stack directory changed on disk after it was loaded.

Already covered elsewhere and not repeated: call.cancel() and deadline expiry freeing the engine, a full queue
(tests/service/test_servicer.py), SIGTERM of an idle server (tests/service/test_server.py), OOM in the engine
unit (tests/service/engine/execution/test_engine.py).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import featurewire_pb2_grpc as pb_grpc
from featurewire.v1 import types_pb2 as t
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core.errors import FailedPrecondition
from service.engine.stacks.served import load_served_stack
from tests.server_process import launch
from tests.service.conftest import MAX_NEW_TOKENS, Running, ServerLoop, server_config, start_server

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "A server that keeps serving whatever its clients do"


def long_generation(tokens: int = MAX_NEW_TOKENS) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=t.Input(text=PROMPT), sampling=pb.SamplingParams(max_new_tokens=tokens,
                                                                                      ignore_eos=True))


def in_flight(running: Running) -> float:
    registry = running.server.metrics.registry
    return sum(registry.get_sample_value("featurewire_in_flight_requests", {"method": m}) or 0.0
               for m in ("Generate", "Decompose", "Score"))


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def decompose(stub: pb_grpc.FeaturewireStub) -> list[pb.DecomposeResponse]:
    request = pb.DecomposeRequest(input=t.Input(text=PROMPT), options=t.DecomposeOptions(top_k=8, include_error=True))
    return list(stub.Decompose(request, timeout=60))


@pytest.fixture(scope="module")
def copied_stack(rel_stack: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(shutil.copytree(rel_stack, tmp_path_factory.mktemp("changing") / "stack"))


@pytest.fixture(scope="module")
def faulty(rel_loop: ServerLoop, copied_stack: Path) -> Iterator[Running]:
    """A server of its own: these tests break its model's forward and its stack directory."""
    running = start_server(rel_loop, server_config(copied_stack, max_new_tokens=MAX_NEW_TOKENS))
    yield running
    running.stop()


# ------------------------------------------------------------------------------------- client disconnect


@pytest.mark.parametrize("rpc", ["Generate", "Decompose"])
def test_a_client_that_disconnects_mid_stream_frees_its_slot(faulty: Running, rpc: str) -> None:
    channel = grpc.insecure_channel(faulty.target)
    stub = pb_grpc.FeaturewireStub(channel)
    if rpc == "Generate":
        stream = stub.Generate(long_generation(), timeout=120)
    else:
        ids = list(range(5, 5 + 500))  # 500 tokens in chunks of one: a long stream
        stream = stub.Decompose(pb.DecomposeRequest(input=t.Input(token_ids=t.TokenIds(ids=ids)), chunk_tokens=1),
                                timeout=120)
    assert next(stream).HasField("header")
    next(stream)
    channel.close()  # the client goes away without cancelling: the transport closes under the stream
    wait_for(lambda: in_flight(faulty) == 0)
    assert faulty.health() == "SERVING"
    assert len(decompose(faulty.stub)) >= 2
    finish = list(faulty.stub.Generate(long_generation(3), timeout=60))[-1].finish
    assert finish.generated_tokens == 3


# ------------------------------------------------------------------------------------------ out of memory


def test_out_of_memory_in_the_engine_is_resource_exhausted_and_the_server_keeps_serving(
        faulty: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    model = faulty.server.host.model.base_model  # every pass runs it: Decompose (no logits) and generation
    real = model.forward
    state = {"calls": 0, "fail_on": {1, 4}}

    def flaky_forward(*args, **kwargs):
        state["calls"] += 1
        if state["calls"] in state["fail_on"]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", flaky_forward)
    with pytest.raises(grpc.RpcError) as prefill:  # the first forward: Decompose's single pass
        decompose(faulty.stub)
    assert prefill.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, prefill.value.details()
    assert "memory" in prefill.value.details()
    events: list[pb.GenerateResponse] = []
    with pytest.raises(grpc.RpcError) as decoding:  # forwards 2 (prefill), 3 (one step), 4 fails mid-stream
        for event in faulty.stub.Generate(long_generation(20), timeout=60):
            events.append(event)
    assert decoding.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, decoding.value.details()
    assert events and events[0].HasField("header")
    monkeypatch.undo()
    assert faulty.health() == "SERVING"
    assert len(decompose(faulty.stub)) >= 2
    assert list(faulty.stub.Generate(long_generation(3), timeout=60))[-1].finish.generated_tokens == 3


# ----------------------------------------------------------------------------------- stack changed on disk


def test_a_stack_changed_on_disk_keeps_serving_its_loaded_copy_and_a_reload_refuses(
        faulty: Running, copied_stack: Path, rel_loop: ServerLoop) -> None:
    """Documented behaviour (docs/reliability.md): the served stack is the verified copy in memory; files changed
    after loading are not re-read, results and digest stay the same; the next load (a restart) verifies every
    hash and refuses the changed directory, naming the file."""
    before = decompose(faulty.stub)
    digest = faulty.stub.ListStacks(pb.ListStacksRequest(), timeout=30).stacks[0].digest
    weights = sorted(copied_stack.glob("stage_00_*.safetensors"))[0]
    data = bytearray(weights.read_bytes())
    data[-8:] = b"\xff" * 8
    weights.write_bytes(bytes(data))  # same size, other bytes
    assert decompose(faulty.stub) == before
    with pytest.raises(FailedPrecondition, match=re.escape(weights.name) + ".* is corrupt"):
        load_served_stack(copied_stack, faulty.server.host)
    missing = sorted(copied_stack.glob("stage_01_*.safetensors"))[0]
    missing.unlink()
    assert decompose(faulty.stub) == before
    assert faulty.stub.ListStacks(pb.ListStacksRequest(), timeout=30).stacks[0].digest == digest
    with pytest.raises(FailedPrecondition, match=re.escape(missing.name) + "' is missing"):
        load_served_stack(copied_stack, faulty.server.host)
    restarted = None
    with pytest.raises(FailedPrecondition, match="cannot serve the stack"):
        restarted = start_server(rel_loop, server_config(copied_stack))
    assert restarted is None
    assert faulty.health() == "SERVING"


# ------------------------------------------------------------------------------------- SIGTERM mid-stream


def _serve(stack: Path, grace: float) -> tuple[subprocess.Popen[str], int, list[str]]:
    server = launch(["--model", "tiny-random", "--device", "cpu", "--stack", str(stack), "--host", "127.0.0.1",
                     "--port", "0", "--metrics-port", "0", "--drain-grace", str(grace),
                     "--max-new-tokens", str(MAX_NEW_TOKENS)])
    return server.process, server.port, server.lines


def test_sigterm_lets_in_flight_streams_finish_and_refuses_new_calls(rel_stack: Path) -> None:
    process, port, lines = _serve(rel_stack, grace=60.0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.FeaturewireStub(channel)
            streams = [stub.Generate(long_generation(), timeout=120) for _ in range(2)]
            for stream in streams:
                assert next(stream).HasField("header")
            process.send_signal(signal.SIGTERM)
            refused = []

            def new_call_code() -> grpc.StatusCode:
                try:
                    stub.Tokenize(pb.TokenizeRequest(text="too late"), timeout=10)
                except grpc.RpcError as exc:
                    refused.append(exc.details())
                    return exc.code()
                return grpc.StatusCode.OK

            wait_for(lambda: new_call_code() == grpc.StatusCode.UNAVAILABLE)
            for stream in streams:
                events = list(stream)  # completes normally: no error status within the grace period
                assert events[-1].HasField("finish") and events[-1].finish.generated_tokens == MAX_NEW_TOKENS
            health = health_pb2_grpc.HealthStub(channel)
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=5).status
                assert status != health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError as exc:  # already stopped: the port is closed
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
        assert process.wait(90) == 0
        assert "featurewire stopped" in "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
