"""Starting a request's Generate calls, and streaming their events as OpenAI's server-sent chunks.

Every call's first message (its header) is awaited before the HTTP status goes out, so a request the server
refuses (a bad intervention, a full queue, a missing token) gets its own status and OpenAI error body, as in
the gateway. After that the stream is `data: <chunk>` events, one per token (or condition, or finish) of any
choice as it arrives, then the usage chunk when `stream_options.include_usage` asked for it, then
`data: [DONE]`. An error after the first chunk can only be told in the stream: a `data: {"error": {...}}`
event (OpenAI's SDKs raise it as an APIError), then `data: [DONE]`.

The client going away (`http.disconnect`) cancels every call at once, so the engine frees the rows then,
not at the next failed write.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
from featurewire.v1 import featurewire_pb2 as pb
from starlette.types import Receive, Send

from service.http.openai.choices import Answer
from service.http.openai.errors import OpenAIError, from_rpc_error
from service.http.sse import WatchedStream, disconnected, sse_event

EOF = grpc.aio.EOF
DONE = sse_event(b"[DONE]")


async def start_calls(calls: list[Any], receive: Receive) -> list[pb.GenerateHeader] | grpc.aio.AioRpcError | None:
    """Each call's header; the first call's error (every call then cancelled); None when the client went away."""
    firsts = asyncio.gather(*(call.read() for call in calls), return_exceptions=True)
    watcher = asyncio.ensure_future(disconnected(receive))
    try:
        await asyncio.wait((firsts, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not firsts.done():
        cancel(calls)
        firsts.cancel()
        return None
    results = firsts.result()
    error = next((r for r in results if isinstance(r, BaseException)), None)
    if error is not None:
        cancel(calls)
        if isinstance(error, grpc.aio.AioRpcError):
            return error
        raise error
    if any(r is EOF or r.WhichOneof("event") != "header" for r in results):
        cancel(calls)
        raise RuntimeError("a Generate stream did not start with its header")
    return [r.header for r in results]


def cancel(calls: list[Any]) -> None:
    for call in calls:
        call.cancel()


async def events(calls: list[Any]) -> AsyncIterator[tuple[int, pb.GenerateResponse]]:
    """(call index, message) of every call as they arrive, until all have ended; a call's error is raised."""
    if len(calls) == 1:
        call = calls[0]
        while (message := await call.read()) is not EOF:
            yield 0, message
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, call: Any) -> None:
        try:
            while (message := await call.read()) is not EOF:
                queue.put_nowait((index, message))
        except BaseException as exc:  # passed on, so the stream ends with it
            queue.put_nowait((index, exc))
            return
        queue.put_nowait((index, EOF))

    tasks = [asyncio.ensure_future(pump(i, c)) for i, c in enumerate(calls)]
    try:
        live = len(calls)
        while live:
            index, item = await queue.get()
            if item is EOF:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


class ChunkStream(WatchedStream):
    """The calls' events as OpenAI chunks (`text/event-stream`); the client disconnecting cancels the calls."""

    def __init__(self, calls: list[Any], answer: Answer, request_id: str) -> None:
        super().__init__(request_id)
        self.calls, self.answer = calls, answer

    def _cancel(self) -> None:
        cancel(self.calls)

    async def _pump(self, send: Send) -> None:
        answer = self.answer

        async def emit(chunk: dict[str, Any], more: bool = True) -> None:
            data = json.dumps(chunk, separators=(",", ":"), ensure_ascii=False).encode()
            await send({"type": "http.response.body", "body": sse_event(data), "more_body": more})

        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        for choice in answer.opening():
            await emit(answer.chunk([choice]))
        try:
            async for index, message in events(self.calls):
                item = answer.on_event(index, message)
                if item is not None:
                    await emit(answer.chunk([item]))
        except grpc.aio.AioRpcError as error:
            cancel(self.calls)
            await emit(from_rpc_error(error).body())
        except OpenAIError as error:
            cancel(self.calls)
            await emit(error.body())
        else:
            if answer.request.include_usage:
                await emit(answer.chunk([], usage=True))
        await send({"type": "http.response.body", "body": DONE, "more_body": False})
