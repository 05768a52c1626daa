"""Errors mapped from status codes, retries on UNAVAILABLE (idempotent calls only, never once a stream has
started), deadlines. The real server provides the validation errors; the scripted fake the failures."""

from __future__ import annotations

import asyncio
import socket
import time

import featurewire as fw
import grpc
import pytest
from featurewire import Intervention, RetryPolicy
from featurewire.errors import ERRORS, from_rpc_error

FAST = RetryPolicy(max_attempts=4, initial_backoff_s=0.001, max_backoff_s=0.01)


@pytest.fixture(scope="module")
def client(target):
    with fw.Client(target, retries=0) as c:
        yield c


@pytest.mark.parametrize(("call", "error", "field"), [
    (lambda c: c.feature("nope", "resid1", 1), fw.NotFound, "stack 'nope'"),
    (lambda c: c.feature("", "nope", 1), fw.NotFound, "stage"),
    (lambda c: c.feature("", "resid1", 10_000), fw.NotFound, "feature"),
    (lambda c: c.decompose("x", top_k=100_000).collect(), fw.InvalidArgument, "top_k"),
    (lambda c: c.decompose("x", stages=["zz"]).header(), fw.NotFound, "stages[0]"),
    (lambda c: c.decompose("", top_k=1).collect(), fw.InvalidArgument, "input.text"),
    (lambda c: c.generate_text("x", max_new_tokens=100_000), fw.InvalidArgument, "max_new_tokens"),
    (lambda c: c.generate_text("x", interventions=[Intervention.clamp("resid1", 1, 2.0, 1.0)]), fw.InvalidArgument,
     "lo <= hi"),
    (lambda c: c.generate_text("x", interventions=[Intervention.set("resid1", 1, 1.0).when("ghost")]),
     fw.InvalidArgument, "condition_id"),
    (lambda c: c.score("x", add_special_tokens=False), fw.InvalidArgument, "at least 2"),
    (lambda c: c.score("The cat", interventions=[fw.Vector("blocks.9.hook_resid_post", [0.0])]), fw.NotFound,
     "hookpoint"),
])
def test_server_errors_raise_the_matching_exception(client, call, error, field):
    with pytest.raises(error) as excinfo:
        call(client)
    e = excinfo.value
    assert isinstance(e, fw.FeaturewireError) and field in e.message and e.status == e.code.name
    assert e.request_id and e.method and e.status in str(e) and e.request_id in str(e)


def test_every_status_code_the_service_sends_has_its_class():
    for code in ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "UNAVAILABLE", "RESOURCE_EXHAUSTED",
                 "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "UNAUTHENTICATED", "INTERNAL"):
        cls = ERRORS[grpc.StatusCode[code]]
        assert cls.code.name == code and issubclass(cls, fw.FeaturewireError) and cls is not fw.FeaturewireError
    assert ERRORS[grpc.StatusCode.UNKNOWN] is fw.Internal and fw.Unavailable.retryable

    class Fake(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.ABORTED

        def details(self):
            return "aborted"

    mapped = from_rpc_error(Fake(), "X")
    assert type(mapped) is fw.FeaturewireError and mapped.status == "ABORTED" and str(mapped) == "ABORTED: aborted [X]"


def test_unary_calls_are_retried_on_unavailable_until_they_succeed(fake):
    fake.script.failures.update(GetServerInfo=2, Tokenize=2, ListStacks=9)
    with fw.Client(fake.target, retries=FAST) as client:
        assert client.info().instance == "fake" and fake.script.calls["GetServerInfo"] == 3
        assert client.tokenize("ab").ids == (1, 2) and fake.script.calls["Tokenize"] == 3
        with pytest.raises(fw.Unavailable, match="still loading"):
            client.stacks()
        assert fake.script.calls["ListStacks"] == FAST.max_attempts


def test_no_retries_means_one_attempt(fake):
    fake.script.failures["GetServerInfo"] = 1
    with fw.Client(fake.target, retries=0) as client, pytest.raises(fw.Unavailable):
        client.info()
    assert fake.script.calls["GetServerInfo"] == 1


def test_streams_are_retried_before_their_first_message_only(fake):
    fake.script.failures.update(Decompose=2, Generate=1)
    fake.script.break_generate_after_header = True
    with fw.Client(fake.target, retries=FAST) as client:
        result = client.decompose("x").collect()
        assert fake.script.calls["Decompose"] == 3 and result.tokens[0].stage("s0").as_dict() == {3: 1.5}
        stream = client.generate("x")
        events = iter(stream)
        assert isinstance(next(events), fw.Started)  # attempt 2; the header streamed, so no more retries
        with pytest.raises(fw.Unavailable, match="lost"):
            next(events)
        assert fake.script.calls["Generate"] == 2


def test_retries_stop_at_the_call_deadline(fake):
    fake.script.failures["GetServerInfo"] = 1000
    slow = RetryPolicy(max_attempts=1000, initial_backoff_s=0.05, max_backoff_s=0.05, jitter=0.0)
    started = time.monotonic()
    with fw.Client(fake.target, retries=slow) as client, pytest.raises(fw.Unavailable):
        client.info(timeout=0.3)
    assert time.monotonic() - started < 2 and 2 <= fake.script.calls["GetServerInfo"] <= 8


def test_a_port_nobody_listens_on_is_unavailable_after_the_retries():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    with fw.Client(f"127.0.0.1:{port}", retries=FAST) as client, pytest.raises(fw.Unavailable):
        client.tokenize("x", timeout=5)


def test_deadline_exceeded(fake, client):
    fake.script.delay_s = 0.5
    with fw.Client(fake.target, timeout=0.05, retries=FAST) as slow, pytest.raises(fw.DeadlineExceeded):
        slow.info()
    assert fake.script.calls["GetServerInfo"] == 1  # DEADLINE_EXCEEDED is never retried
    with pytest.raises(fw.DeadlineExceeded):
        client.generate_text("The cat", max_new_tokens=400, ignore_eos=True, timeout=0.01)


def test_unimplemented_is_its_own_exception(fake):
    with fw.Client(fake.target) as client, pytest.raises(fw.Unimplemented):
        list(client.encode_activations([[[0.0, 1.0]]], stage="s"))

    async def run() -> None:
        async with fw.AsyncClient(fake.target) as aclient:
            with pytest.raises(fw.Unimplemented):
                async for _ in aclient.encode_activations([[[0.0, 1.0]]], stage="s"):
                    pass

    asyncio.run(run())


def test_a_malformed_array_raises_its_own_error(fake):
    bad = [[[0.0, 1.0]], [[[0.0]]]]
    with fw.Client(fake.target) as client, pytest.raises((ValueError, fw.Unimplemented)):
        list(client.encode_activations(iter(bad), stage="s"))
    with fw.Client(fake.target) as client, pytest.raises(ValueError):
        list(client.encode_activations([[[0.0, 1.0], [2.0]]], stage="s"))

    async def run() -> None:
        async with fw.AsyncClient(fake.target) as aclient:
            with pytest.raises(ValueError):
                async for _ in aclient.encode_activations([[[0.0, 1.0], [2.0]]], stage="s"):
                    pass

    asyncio.run(run())


def test_async_retries_and_errors(fake, target):
    fake.script.failures.update(GetServerInfo=2, Decompose=1)
    fake.script.break_generate_after_header = True

    async def run() -> None:
        async with fw.AsyncClient(fake.target, retries=FAST) as client:
            assert (await client.info()).instance == "fake"
            assert len(await client.decompose("x").collect()) == 1
            with pytest.raises(fw.Unavailable):
                await client.generate_text("x")
        async with fw.AsyncClient(target, retries=0) as client:
            with pytest.raises(fw.NotFound):
                await client.feature("nope", "resid1", 1)
            with pytest.raises(fw.InvalidArgument, match="top_k"):
                await client.decompose("x", top_k=100_000).header()
            with pytest.raises(fw.DeadlineExceeded):
                await client.generate_text("The cat", max_new_tokens=400, ignore_eos=True, timeout=0.01)

    asyncio.run(run())
    assert fake.script.calls["GetServerInfo"] == 3 and fake.script.calls["Decompose"] == 2
    assert fake.script.calls["Generate"] == 1
