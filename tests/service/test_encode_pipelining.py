"""Pipelined EncodeActivations through the real server: calls that end (a bad batch, a refused token) while the
client is still writing batches report the server's status, never grpc.aio's "INTERNAL: Internal error from Core".

The server reads what the client is still sending before it ends a request-streaming call with an error
(service/interceptors.py: drain_requests), so no client write can race with the status (grpc/grpc#36066).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from featurewire import AsyncClient
from featurewire.errors import NotFound
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import featurewire_pb2_grpc as pb_grpc

from tests.service.conftest import Running, ServerLoop, server_config, start_server
from tests.service.onnx_stacks import HOOKPOINTS, SIGNED, captured, encode_requests, write_resae_stack

CALLS = 240
TOKEN = "pipelining-token"


@pytest.fixture(scope="module")
def resae_stack(tmp_path_factory: pytest.TempPathFactory, tiny_gemma) -> Path:
    return write_resae_stack(tmp_path_factory.mktemp("pipelining") / "stack", tiny_gemma)


@pytest.fixture(scope="module")
def guarded(server_loop: ServerLoop, resae_stack: Path) -> Iterator[Running]:
    running = start_server(server_loop, server_config(resae_stack, self_check=False, max_batch_vectors=40,
                                                      auth_token=TOKEN))
    yield running
    running.stop()


def _requests(tiny_gemma) -> tuple[list[pb.EncodeActivationsRequest], pb.EncodeActivationsRequest]:
    good = encode_requests(captured(tiny_gemma))
    bad = pb.EncodeActivationsRequest()
    bad.CopyFrom(good[0])
    bad.stage = "no-such-stage"
    return good, bad


async def _pipelined(channel: grpc.aio.Channel, writes: list[pb.EncodeActivationsRequest], token: str) -> str:
    """Write every request without waiting for answers (then half-close); return the call's final status."""
    metadata = (("authorization", f"Bearer {token}"),)
    call = pb_grpc.FeaturewireStub(channel).EncodeActivations(timeout=30, metadata=metadata)

    async def write() -> None:
        try:
            for request in writes:
                await call.write(request)
            await call.done_writing()
        except (grpc.RpcError, asyncio.InvalidStateError):
            pass  # the call is over: its status comes from the read side

    writer = asyncio.ensure_future(write())
    try:
        while await call.read() is not grpc.aio.EOF:
            pass
        return "OK"
    except grpc.RpcError as error:
        return f"{error.code().name}: {error.details()}"
    finally:
        await asyncio.gather(writer, return_exceptions=True)


def test_calls_ending_while_batches_are_being_written_keep_their_status(guarded: Running, tiny_gemma) -> None:
    good, bad = _requests(tiny_gemma)

    async def run() -> Counter[str]:
        async with grpc.aio.insecure_channel(guarded.target) as channel:
            outcomes: Counter[str] = Counter()
            for i in range(CALLS):
                before, after = i % 4, 8 + i % 16  # good batches answered before the bad one, then still written
                writes = [good[j % len(good)] for j in range(before)] + [bad] + [good[j % 4] for j in range(after)]
                token = TOKEN if i % 5 else "wrong-token"
                outcomes[(await _pipelined(channel, writes, token)).split(":")[0]] += 1
            return outcomes

    outcomes = asyncio.run(run())
    assert outcomes == Counter({"NOT_FOUND": CALLS - CALLS // 5, "UNAUTHENTICATED": CALLS // 5}), outcomes


def test_a_client_that_waits_for_each_answer_gets_the_error_at_once(guarded: Running, tiny_gemma) -> None:
    """The drain stops when nothing more arrives: a ping-pong client is not kept waiting for its status."""
    good, bad = _requests(tiny_gemma)

    async def run() -> tuple[str, float]:
        async with grpc.aio.insecure_channel(guarded.target) as channel:
            call = pb_grpc.FeaturewireStub(channel).EncodeActivations(
                timeout=30, metadata=(("authorization", f"Bearer {TOKEN}"),))
            await call.write(good[0])
            assert (await call.read()).sequence == good[0].sequence
            started = time.perf_counter()
            await call.write(bad)
            try:
                await call.read()
            except grpc.RpcError as error:
                return error.code().name, time.perf_counter() - started
            return "OK", 0.0

    code, seconds = asyncio.run(run())
    assert code == "NOT_FOUND" and seconds < 2.0


def test_the_async_client_pipelines_batches_and_reports_a_bad_one(guarded: Running, tiny_gemma) -> None:
    acts = captured(tiny_gemma)[HOOKPOINTS[0]]
    batches = [acts[i % 4 : i % 4 + 3] for i in range(24)]

    async def run() -> tuple[int, list[str]]:
        async with AsyncClient(guarded.target, token=TOKEN) as client:
            answered = [b async for b in client.encode_activations(batches, stage=SIGNED, window=8)]
            failures = []
            for _ in range(40):
                try:
                    async for _batch in client.encode_activations(batches, stage="no-such-stage", window=8):
                        pass
                except NotFound as error:
                    failures.append(type(error).__name__)
            return len(answered), failures

    answered, failures = asyncio.run(run())
    assert answered == len(batches) and failures == ["NotFound"] * 40
