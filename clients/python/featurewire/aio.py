"""The asyncio client: `AsyncClient` has Client's methods, as coroutines and async iterators (grpc.aio).

    async with AsyncClient("localhost:50051") as fw:
        info = await fw.info()
        async for event in fw.generate("Hello", max_new_tokens=8):
            ...
        result = await fw.generate_text("Hello", with_default=True)

The channel is created on first use, inside the running event loop. Retries and deadlines follow
Client's rules.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import grpc
import grpc.aio

from featurewire import _requests as rq
from featurewire import events as ev
from featurewire import results as rs
from featurewire._transport import (
    DEFAULT,
    DEFAULT_KEEPALIVE_S,
    DEFAULT_STREAM_TIMEOUT_S,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT_S,
    NO_RETRY,
    Deadline,
    RetryPolicy,
    Settings,
    next_delay,
)
from featurewire.builders import Condition, Edit
from featurewire.errors import from_rpc_error
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import featurewire_pb2_grpc as pb_grpc


class _AsyncStream:
    """A server-streaming call opened on first use, retried on UNAVAILABLE until its first message."""

    def __init__(self, client: AsyncClient, method: str, request: Any, timeout: Any, *, retry: bool) -> None:
        self._client, self._method, self._request = client, method, request
        self._timeout = client.settings.timeout_for(timeout, stream=True)
        self._policy = client.settings.retry if retry else NO_RETRY
        self._call: Any = None
        self._first: list[Any] = []

    async def _open(self) -> None:
        if self._call is not None:
            return
        deadline, retry = Deadline(self._timeout), 0
        stub_method = getattr(self._client.stub, self._method)
        while True:
            call = stub_method(self._request, timeout=deadline.remaining(), metadata=self._client.settings.metadata)
            try:
                first = await call.read()
            except grpc.RpcError as error:
                delay = next_delay(error, self._policy, retry, deadline)
                if delay is None:
                    self._call = call
                    raise from_rpc_error(error, self._method) from None
                await asyncio.sleep(delay)
                retry += 1
                continue
            self._call = call
            self._first = [] if first is grpc.aio.EOF else [first]
            return

    async def _messages(self) -> AsyncIterator[Any]:
        await self._open()
        while self._first:
            yield self._first.pop(0)
        try:
            while (message := await self._call.read()) is not grpc.aio.EOF:
                yield message
        except grpc.RpcError as error:
            raise from_rpc_error(error, self._method) from None

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()

    async def __aenter__(self) -> _AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class AsyncDecomposeStream(_AsyncStream):
    """Async iterator of TokenFeatures; `await header()` for the stages and token count."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header: ev.DecomposeHeader | None = None
        self._iter = self._messages()

    async def header(self) -> ev.DecomposeHeader:
        if self._header is None:
            message = await anext(self._iter, None)
            if message is None or message.WhichOneof("event") != "header":
                raise RuntimeError("the Decompose stream did not start with a header")
            self._header = ev.decompose_header(message.header)
        return self._header

    async def __aiter__(self) -> AsyncIterator[ev.TokenFeatures]:
        names = {s.index: s.name for s in (await self.header()).stages}
        async for message in self._iter:
            if message.WhichOneof("event") == "chunk":
                for token in message.chunk.tokens:
                    yield ev.token_features(token, names)

    async def collect(self) -> ev.Decomposition:
        header = await self.header()
        return ev.Decomposition(header, tuple([tok async for tok in self]))


class AsyncGenerateStream(_AsyncStream):
    """Async iterator of Generate events (Started, Token, ConditionFired, Finished)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[ev.GenerateEvent] = []
        self._iter = self._events()

    async def _events(self) -> AsyncIterator[ev.GenerateEvent]:
        names: dict[int, str] = {}
        async for message in self._messages():
            event = ev.generate_event(message, names)
            if isinstance(event, ev.Started):
                names.update((s.index, s.name) for s in event.stages)
            if event is not None:
                self.events.append(event)
                yield event

    def __aiter__(self) -> AsyncIterator[ev.GenerateEvent]:
        return self._iter

    async def collect(self) -> ev.Generation:
        async for _ in self._iter:
            pass
        return ev.collect_generation(self.events)


class AsyncClient:
    """Client's API for asyncio code; same arguments (see Client)."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None, tls: Any = False,
                 timeout: float | None = DEFAULT_TIMEOUT_S, stream_timeout: float | None = DEFAULT_STREAM_TIMEOUT_S,
                 options: Sequence[tuple[str, Any]] | dict[str, Any] = (), retries: int | RetryPolicy | None = None,
                 metadata: Sequence[tuple[str, str]] = (), load_balancing: str | None = None,
                 keepalive_s: float | None = DEFAULT_KEEPALIVE_S) -> None:
        self.settings = Settings.build(target, token=token, tls=tls, timeout=timeout, stream_timeout=stream_timeout,
                                       options=options, retries=RetryPolicy() if retries is None else retries,
                                       metadata=metadata, load_balancing=load_balancing, keepalive_s=keepalive_s)
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.FeaturewireStub | None = None

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            s = self.settings
            self._channel = (grpc.aio.secure_channel(s.target, s.credentials, options=s.options)
                             if s.credentials is not None else grpc.aio.insecure_channel(s.target, options=s.options))
        return self._channel

    @property
    def stub(self) -> pb_grpc.FeaturewireStub:
        if self._stub is None:
            self._stub = pb_grpc.FeaturewireStub(self.channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(self, method: str, request: Any, convert: Callable[[Any], Any], timeout: Any) -> Any:
        deadline, retry = Deadline(self.settings.timeout_for(timeout, stream=False)), 0
        call = getattr(self.stub, method)
        while True:
            try:
                return convert(await call(request, timeout=deadline.remaining(), metadata=self.settings.metadata))
            except grpc.RpcError as error:
                delay = next_delay(error, self.settings.retry, retry, deadline)
                if delay is None:
                    raise from_rpc_error(error, method) from None
            await asyncio.sleep(delay)
            retry += 1

    async def info(self, *, timeout: Any = DEFAULT) -> rs.ServerInfo:
        return await self._unary("GetServerInfo", pb.GetServerInfoRequest(), rs.server_info, timeout)

    async def stacks(self, *, timeout: Any = DEFAULT) -> tuple[rs.StackInfo, ...]:
        return await self._unary("ListStacks", pb.ListStacksRequest(),
                                 lambda m: tuple(rs.stack_info(s) for s in m.stacks), timeout)

    async def feature(self, stack: str, stage: str, feature: int, *, top_n: int = 0,
                      timeout: Any = DEFAULT) -> rs.Feature:
        return await self._unary("GetFeature", rq.feature_request(stack, stage, feature, top_n), rs.feature, timeout)

    async def tokenize(self, text: str, *, add_special_tokens: bool | None = None,
                       timeout: Any = DEFAULT) -> rs.Tokens:
        return await self._unary("Tokenize", rq.tokenize_request(text, add_special_tokens), rs.tokens, timeout)

    async def score(self, text: rq.TextOrIds, *, interventions: Iterable[Edit] = (),
                    splice: Sequence[str] | str = (), stack: str = "", add_special_tokens: bool | None = None,
                    timeout: Any = DEFAULT) -> rs.ScoreResult:
        request = rq.score_request(text, stack=stack, interventions=interventions, splice=splice,
                                   add_special_tokens=add_special_tokens)
        return await self._unary("Score", request, rs.score, timeout)

    def decompose(self, text: rq.TextOrIds, *, stages: Sequence[str] | str | None = None, top_k: int = 0,
                  include_error: bool = True, always: dict[str, Sequence[int]] | None = None, stack: str = "",
                  chunk_tokens: int = 0, add_special_tokens: bool | None = None,
                  timeout: Any = DEFAULT) -> AsyncDecomposeStream:
        request = rq.decompose_request(text, stack=stack, stages=stages, top_k=top_k, include_error=include_error,
                                       always=always, chunk_tokens=chunk_tokens, add_special_tokens=add_special_tokens)
        return AsyncDecomposeStream(self, "Decompose", request, timeout, retry=True)

    def generate(self, prompt: rq.TextOrIds, *, interventions: Iterable[Edit] = (),
                 conditions: Iterable[Condition] = (), decompose: Any = None, with_default: bool = False,
                 stack: str = "", add_special_tokens: bool | None = None, timeout: Any = DEFAULT,
                 **sampling: Any) -> AsyncGenerateStream:
        request = rq.generate_request(prompt, stack=stack, interventions=interventions, conditions=conditions,
                                      decompose=decompose, with_default=with_default,
                                      add_special_tokens=add_special_tokens, options=sampling)
        return AsyncGenerateStream(self, "Generate", request, timeout, retry=True)

    async def generate_text(self, prompt: rq.TextOrIds, **kwargs: Any) -> ev.Generation:
        return await self.generate(prompt, **kwargs).collect()

    async def encode_activations(self, arrays: Iterable[Any] | AsyncIterable[Any], *, stage: str, stack: str = "",
                                 previous: Iterable[Any] | None = None, top_k: int = 0, include_error: bool = False,
                                 window: int = 1, timeout: Any = DEFAULT) -> AsyncIterator[ev.EncodedBatch]:
        """Batches may come from a sync or an async iterable (e.g. activations captured as they arrive);
        `window` batches are in flight at a time.

        Why a window: grpc.aio turns the server's status into "INTERNAL: Internal error from Core" when a
        write races with the end of the call. With one batch in flight, a batch is written only after the
        previous one was answered, so a bad batch's status (INVALID_ARGUMENT naming the field) arrives
        intact; when the very first write races with an immediate refusal (UNIMPLEMENTED, UNAUTHENTICATED,
        UNAVAILABLE), a request-less probe call recovers the real status."""
        timeout = self.settings.timeout_for(timeout, stream=True)
        call = self.stub.EncodeActivations(timeout=timeout, metadata=self.settings.metadata)
        slots = asyncio.Semaphore(max(1, window))
        writer = asyncio.ensure_future(_write_requests(call, _arrays(arrays), slots, stage=stage, stack=stack,
                                                       previous=previous, top_k=top_k, include_error=include_error))
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                slots.release()
                yield ev.encoded_batch(message, stage)
            await writer
        except (grpc.RpcError, asyncio.CancelledError) as error:
            if writer.done() and not writer.cancelled() and writer.exception() is not None:
                raise writer.exception() from None  # our side went wrong first (e.g. a malformed array)
            if isinstance(error, asyncio.CancelledError):
                raise
            if error.code() == grpc.StatusCode.INTERNAL and error.details() == CORE_WRITE_RACE:
                error = await self._refusal(timeout) or error
            raise from_rpc_error(error, "EncodeActivations") from None
        finally:
            call.cancel()
            writer.cancel()

    async def _refusal(self, timeout: float | None) -> grpc.RpcError | None:
        """The status of an EncodeActivations call that sends nothing: how the server refuses every call."""
        probe = self.stub.EncodeActivations(timeout=min(timeout or 10.0, 10.0), metadata=self.settings.metadata)
        try:
            await probe.done_writing()
            while await probe.read() is not grpc.aio.EOF:
                pass
        except grpc.RpcError as error:
            return error if error.code() != grpc.StatusCode.INTERNAL else None
        return None


CORE_WRITE_RACE = "Internal error from Core"


async def _arrays(arrays: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(arrays, AsyncIterable):
        async for array in arrays:
            yield array
    else:
        for array in arrays:
            yield array


async def _write_requests(call: Any, arrays: AsyncIterator[Any], slots: asyncio.Semaphore, *, stage: str, stack: str,
                          previous: Iterable[Any] | None, top_k: int, include_error: bool) -> None:
    """Write one request per array when a slot is free, then half-close; stop quietly once the call has ended."""
    sequence, prev = 0, iter(previous) if previous is not None else None
    try:
        async for array in arrays:
            (message,) = rq.encode_requests([array], stage=stage, stack=stack,
                                            previous=None if prev is None else [next(prev)], top_k=top_k,
                                            include_error=include_error)
            message.sequence = sequence
            await slots.acquire()
            await call.write(message)
            sequence += 1
        await call.done_writing()
    except (grpc.RpcError, asyncio.InvalidStateError):
        return  # the call is over; its status comes from the read side
    except BaseException:
        call.cancel()
        raise
