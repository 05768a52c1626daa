"""AsyncClient against the in-process server: every method, with the same results as the sync Client."""

from __future__ import annotations

import asyncio

import featurewire as fw
import pytest
from featurewire import Condition, Intervention

from tests.clients.conftest import STAGES

PROMPT = "The cat sat on the mat"


@pytest.fixture(scope="module")
def client(target):
    with fw.Client(target) as c:
        yield c


def run(target: str, body) -> object:
    async def main() -> object:
        async with fw.AsyncClient(target) as aclient:
            return await body(aclient)

    return asyncio.run(main())


def test_unary_methods_match_the_sync_client(target, client):
    async def body(a: fw.AsyncClient) -> tuple:
        return (await a.info(), await a.stacks(), await a.tokenize("hello"), await a.feature("", "mlp2", 5, top_n=3),
                await a.score(PROMPT, splice=["resid1"]))

    info, stacks, tokens, feature, score = run(target, body)
    assert info.stacks == client.info().stacks and info.model == client.info().model and stacks == info.stacks
    assert tokens == client.tokenize("hello") and feature == client.feature("", "mlp2", 5, top_n=3)
    assert score == client.score(PROMPT, splice=["resid1"])


def test_decompose_streams_in_order_like_the_sync_client(target, client):
    async def body(a: fw.AsyncClient) -> tuple:
        stream = a.decompose(PROMPT, top_k=2, chunk_tokens=3)
        header = await stream.header()
        tokens = [token async for token in stream]
        return header, tokens, await a.decompose(PROMPT, top_k=2).collect()

    header, tokens, collected = run(target, body)
    expected = client.decompose(PROMPT, top_k=2).collect()
    assert header == expected.header and [t.position for t in tokens] == list(range(header.num_tokens))
    for mine, theirs, again in zip(tokens, expected.tokens, collected.tokens, strict=True):
        assert (mine.id, mine.text) == (theirs.id, theirs.text) and [c.name for c in mine.features] == list(STAGES)
        for a, b, c in zip(mine.features, theirs.features, again.features, strict=True):
            assert a.ids == b.ids == c.ids and a.values == pytest.approx(b.values, rel=1e-4, abs=1e-5)


def test_generate_streams_events_like_the_sync_client(target, client):
    edit = Intervention.add("resid1", 3, 5.0, positions="generated")
    kwargs = {"interventions": [edit], "with_default": True, "max_new_tokens": 5, "seed": 7, "ignore_eos": True,
              "decompose": 2}

    async def body(a: fw.AsyncClient) -> tuple:
        events = [event async for event in a.generate(PROMPT, **kwargs)]
        return events, await a.generate_text(PROMPT, **kwargs)

    events, result = run(target, body)
    expected = client.generate(PROMPT, **kwargs)
    assert events == list(expected) and result == expected.collect()
    assert isinstance(events[0], fw.Started) and isinstance(events[-1], fw.Finished)
    assert all(len(e.features) == 4 for e in events if isinstance(e, fw.Token))


def test_conditions_and_encode_activations(target, client):
    free = client.generate_text(PROMPT, max_new_tokens=5, seed=0, ignore_eos=True, decompose=["resid1"])
    feature, value = free.tokens[1].stage("resid1").top(1)[0]
    stop = Condition.above("resid1", feature, value / 2).stop()
    served = "EncodeActivations" in client.info().capabilities.rpcs

    async def body(a: fw.AsyncClient) -> tuple:
        stopped = await a.generate_text(PROMPT, max_new_tokens=5, seed=0, ignore_eos=True, conditions=[stop])
        try:
            encoded = [b async for b in a.encode_activations([[[0.5] * 64, [1.0] * 64]], stage="resid1", top_k=2)]
        except fw.Unimplemented:
            encoded = None
        return stopped, encoded

    stopped, encoded = run(target, body)
    assert stopped.finished.reason == "FEATURE_CONDITION" and stopped.finished.trigger.feature == feature
    assert (encoded is not None) == served
    if served:
        assert len(encoded) == 1 and len(encoded[0].rows) == 2 and encoded[0].rows[0].name == "resid1"


def test_async_encode_accepts_an_async_source(fake):
    async def arrays():
        yield [[0.0, 1.0]]

    async def body(a: fw.AsyncClient) -> None:
        with pytest.raises(fw.Unimplemented):
            async for _ in a.encode_activations(arrays(), stage="s"):
                pass

    run(fake.target, body)


def test_a_bad_batch_ends_the_encode_stream_with_its_own_status(target, client):
    """One batch in flight at a time: the server's INVALID_ARGUMENT is not lost to a write racing the end."""
    if "EncodeActivations" not in client.info().capabilities.rpcs:
        pytest.skip("this server does not serve EncodeActivations")
    batches = [[[0.5] * 64], [[0.5] * 3], [[0.5] * 64]]
    with pytest.raises(fw.InvalidArgument, match="cols"):
        list(client.encode_activations(batches, stage="resid1"))

    async def body(a: fw.AsyncClient) -> list:
        answered = []
        with pytest.raises(fw.InvalidArgument, match="cols"):
            async for batch in a.encode_activations(batches, stage="resid1"):
                answered.append(batch.sequence)
        return answered

    for _ in range(5):
        assert run(target, body) == [0]
