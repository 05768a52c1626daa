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
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from typing import Any

import grpc
import grpc.aio

from featurewire import _requests as rq
from featurewire import events as ev
from featurewire import feature_results as fr
from featurewire import results as rs
from featurewire._transport import DEFAULT, ClientBase, Deadline, StreamBase, next_delay
from featurewire.builders import Condition, Edit
from featurewire.errors import from_rpc_error
from featurewire.v1 import featurewire_pb2_grpc as pb_grpc


class _AsyncStream(StreamBase):
    """A server-streaming call opened on first use, retried on UNAVAILABLE until its first message."""

    async def _open(self) -> None:
        if self._call is not None:
            return
        deadline, retry = Deadline(self._timeout), 0
        stub_method = getattr(self._client.stub, self._rpc.method)
        while True:
            call = stub_method(self._rpc.request, timeout=deadline.remaining(), metadata=self._client.settings.metadata)
            try:
                first = await call.read()
            except grpc.RpcError as error:
                delay = next_delay(error, self._policy, retry, deadline)
                if delay is None:
                    self._call = call
                    raise from_rpc_error(error, self._rpc.method) from None
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
            raise from_rpc_error(error, self._rpc.method) from None

    async def __aenter__(self) -> _AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class AsyncDecomposeStream(_AsyncStream):
    """Async iterator of TokenFeatures; `await header()` for the stages and token count."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reader = ev.DecomposeReader()
        self._iter = self._messages()

    async def header(self) -> ev.DecomposeHeader:
        if self._reader.header is None:
            self._reader.start(await anext(self._iter, None))
        return self._reader.header

    async def __aiter__(self) -> AsyncIterator[ev.TokenFeatures]:
        await self.header()
        async for message in self._iter:
            for token in self._reader.tokens(message):
                yield token

    async def collect(self) -> ev.Decomposition:
        header = await self.header()
        return ev.Decomposition(header, tuple([tok async for tok in self]))


class AsyncGenerateStream(_AsyncStream):
    """Async iterator of Generate events (Started, Token, ConditionFired, Finished)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reader = ev.GenerateReader()
        self.events = self._reader.events
        self._iter = self._events()

    async def _events(self) -> AsyncIterator[ev.GenerateEvent]:
        async for message in self._messages():
            event = self._reader.event(message)
            if event is not None:
                yield event

    def __aiter__(self) -> AsyncIterator[ev.GenerateEvent]:
        return self._iter

    async def collect(self) -> ev.Generation:
        async for _ in self._iter:
            pass
        return self._reader.generation()


class AsyncClient(ClientBase):
    """Client's API for asyncio code; same arguments (see Client)."""

    def _connect(self) -> None:
        """Nothing yet: a grpc.aio channel belongs to the event loop it is created in."""
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

    async def _unary(self, rpc: rq.Call, timeout: Any) -> Any:
        deadline, retry = Deadline(self.settings.timeout_for(timeout, stream=False)), 0
        call = getattr(self.stub, rpc.method)
        while True:
            try:
                return rpc.convert(await call(rpc.request, timeout=deadline.remaining(),
                                              metadata=self.settings.metadata))
            except grpc.RpcError as error:
                delay = next_delay(error, self.settings.retry, retry, deadline)
                if delay is None:
                    raise from_rpc_error(error, rpc.method) from None
            await asyncio.sleep(delay)
            retry += 1

    async def info(self, *, timeout: Any = DEFAULT) -> rs.ServerInfo:
        return await self._unary(rq.info(), timeout)

    async def stacks(self, *, timeout: Any = DEFAULT) -> tuple[rs.StackInfo, ...]:
        return await self._unary(rq.stacks(), timeout)

    async def feature(self, stack: str, stage: str, feature: int, *, top_n: int = 0,
                      timeout: Any = DEFAULT) -> rs.Feature:
        return await self._unary(rq.feature(stack, stage, feature, top_n), timeout)

    async def search_features(self, text: str | None = None, *, span: tuple[int, int] | None = None,
                              token: str | int | None = None, explanation: str | None = None,
                              stages: Sequence[str] | str | None = None, reduce: str = "max",
                              direction: str = "promotes", stack: str = "", page_size: int = 0, page_token: str = "",
                              add_special_tokens: bool | None = None, timeout: Any = DEFAULT) -> fr.SearchResult:
        return await self._unary(rq.search_features(text=text, span=span, token=token, explanation=explanation,
                                                    stages=stages, reduce=reduce, direction=direction, stack=stack,
                                                    page_size=page_size, page_token=page_token,
                                                    add_special_tokens=add_special_tokens), timeout)

    async def list_features(self, stage: str, *, min_density: float | None = None, max_density: float | None = None,
                            sort: str = "density", descending: bool = False, stack: str = "", page_size: int = 0,
                            page_token: str = "", steerable_only: bool = False,
                            timeout: Any = DEFAULT) -> fr.FeatureList:
        return await self._unary(rq.list_features(stage, min_density=min_density, max_density=max_density, sort=sort,
                                                  descending=descending, stack=stack, page_size=page_size,
                                                  page_token=page_token, steerable_only=steerable_only), timeout)

    async def tokenize(self, text: str, *, add_special_tokens: bool | None = None,
                       timeout: Any = DEFAULT) -> rs.Tokens:
        return await self._unary(rq.tokenize(text, add_special_tokens), timeout)

    async def score(self, text: rq.TextOrIds, *, interventions: Iterable[Edit] = (),
                    splice: Sequence[str] | str = (), stack: str = "", add_special_tokens: bool | None = None,
                    timeout: Any = DEFAULT) -> rs.ScoreResult:
        return await self._unary(rq.score(text, interventions=interventions, splice=splice, stack=stack,
                                          add_special_tokens=add_special_tokens), timeout)

    def decompose(self, text: rq.TextOrIds, *, stages: Sequence[str] | str | None = None, top_k: int = 0,
                  include_error: bool = True, always: dict[str, Sequence[int]] | None = None, stack: str = "",
                  chunk_tokens: int = 0, add_special_tokens: bool | None = None,
                  timeout: Any = DEFAULT) -> AsyncDecomposeStream:
        return AsyncDecomposeStream(self, rq.decompose(text, stages=stages, top_k=top_k, include_error=include_error,
                                                       always=always, stack=stack, chunk_tokens=chunk_tokens,
                                                       add_special_tokens=add_special_tokens), timeout)

    def generate(self, prompt: rq.TextOrIds, *, interventions: Iterable[Edit] = (),
                 conditions: Iterable[Condition] = (), decompose: Any = None, with_default: bool = False,
                 stack: str = "", add_special_tokens: bool | None = None, timeout: Any = DEFAULT,
                 **sampling: Any) -> AsyncGenerateStream:
        return AsyncGenerateStream(self, rq.generate(prompt, interventions=interventions, conditions=conditions,
                                                     decompose=decompose, with_default=with_default, stack=stack,
                                                     add_special_tokens=add_special_tokens, options=sampling), timeout)

    async def generate_text(self, prompt: rq.TextOrIds, **kwargs: Any) -> ev.Generation:
        return await self.generate(prompt, **kwargs).collect()

    async def encode_activations(self, arrays: Iterable[Any] | AsyncIterable[Any], *, stage: str, stack: str = "",
                                 previous: Iterable[Any] | None = None, top_k: int = 0, include_error: bool = False,
                                 window: int = 16, timeout: Any = DEFAULT) -> AsyncIterator[ev.EncodedBatch]:
        """Batches may come from a sync or an async iterable (e.g. activations captured as they arrive); up to
        `window` batches are written ahead of their answers (pipelined), which bounds the memory held in flight.
        A bad batch ends the stream with the server's status (the server reads what is still being written
        before it answers, so no write races with the status). A refusal that comes before any handler runs
        (UNIMPLEMENTED from a server without the method, or from gRPC itself) cannot wait for the writes; when
        grpc.aio then reports "INTERNAL: Internal error from Core" instead (grpc/grpc#36066), a request-less
        probe call recovers the real status."""
        encoder = rq.Encoder(stage=stage, stack=stack, previous=previous, top_k=top_k, include_error=include_error)
        timeout = self.settings.timeout_for(timeout, stream=True)
        call = getattr(self.stub, encoder.method)(timeout=timeout, metadata=self.settings.metadata)
        slots = asyncio.Semaphore(max(1, window))
        writer = asyncio.ensure_future(_write_requests(call, _arrays(arrays), slots, encoder))
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                slots.release()
                yield encoder.result(message)
            await writer
        except (grpc.RpcError, asyncio.CancelledError) as error:
            if writer.done() and not writer.cancelled() and writer.exception() is not None:
                raise writer.exception() from None  # our side went wrong first (e.g. a malformed array)
            if isinstance(error, asyncio.CancelledError):
                raise
            if error.code() == grpc.StatusCode.INTERNAL and error.details() == CORE_WRITE_RACE:
                error = await self._refusal(timeout) or error
            raise from_rpc_error(error, encoder.method) from None
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


async def _write_requests(call: Any, arrays: AsyncIterator[Any], slots: asyncio.Semaphore,
                          encoder: rq.Encoder) -> None:
    """Write one request per array when a slot is free, then half-close; stop quietly once the call has ended."""
    try:
        async for array in arrays:
            message = encoder.request(array)
            await slots.acquire()
            await call.write(message)
        await call.done_writing()
    except (grpc.RpcError, asyncio.InvalidStateError):
        return  # the call is over; its status comes from the read side
    except BaseException:
        call.cancel()
        raise
