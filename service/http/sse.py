"""Server-streaming calls as server-sent events, and the cancellation of a call whose HTTP client went away.

Framing: one `data: <JSON>` event per response message (proto3 JSON on one line, so one `data:` field),
then `event: status` with `{"code", "message", "request_id"}` (code "OK" when the stream completed), and
the response ends. The HTTP status is already 200 when the first event goes out, so an error after it
can only be told in that status event; the gateway awaits the first message before answering for that
reason (an early error keeps its own HTTP status).

Disconnects: once the body is read, the only ASGI message left to receive is `http.disconnect`; a watcher
task waits for it next to the work and cancels the gRPC call when it comes first, so the server's handler
sees the cancellation (a generation's generator is closed and the engine slot freed) at once, not when
the next write fails.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import Any

import grpc
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.http.codes import error_body
from service.http.jsonmap import to_json
from service.interceptors import REQUEST_ID_KEY

EOF = grpc.aio.EOF


class _Gone:
    """The HTTP client disconnected before the call finished (its call is cancelled)."""


GONE = _Gone()


def request_id_in(metadata: Any, fallback: str) -> str:
    """The id the server returned in trailing metadata (RequestIdInterceptor), else the one the gateway sent."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            return value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return fallback


def sse_event(data: bytes, event: str | None = None) -> bytes:
    """One server-sent event: an optional `event:` line, one `data:` line (JSON has no raw newlines), a blank line."""
    return (f"event: {event}\n".encode() if event else b"") + b"data: " + data + b"\n\n"


async def disconnected(receive: Receive) -> None:
    """Returns when the client goes away (the body has been read, so only `http.disconnect` is left)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_gone(work: Awaitable[Any], call: grpc.aio.Call, receive: Receive) -> Any:
    """`await work`, unless the client disconnects first: then the call is cancelled and GONE returned."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            call.cancel()
            task.cancel()
    return task.result() if task.done() and not task.cancelled() else GONE


class WatchedStream(Response):
    """A streamed `text/event-stream` answer whose work is cancelled when the client disconnects. Subclasses write
    the body in `_pump(send)` and stop their gRPC call(s) in `_cancel()`."""

    media_type = "text/event-stream"

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no", REQUEST_ID_KEY: request_id})

    async def _pump(self, send: Send) -> None:
        raise NotImplementedError

    def _cancel(self) -> None:
        raise NotImplementedError

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        watcher = asyncio.ensure_future(disconnected(receive))
        try:
            await asyncio.wait((pump, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not pump.done():  # the client went away (or uvicorn is cancelling us): stop the work
                self._cancel()
                pump.cancel()
        error = pump.exception() if pump.done() and not pump.cancelled() else None
        if isinstance(error, OSError):  # a write after the client disconnected
            self._cancel()
        elif error is not None:
            raise error


class EventStream(WatchedStream):
    """A server-streaming call as server-sent events; the client disconnecting cancels the call."""

    def __init__(self, call: Any, first: Any, request_id: str) -> None:
        super().__init__(request_id)
        self.call, self.first = call, first

    def _cancel(self) -> None:
        self.call.cancel()

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        message, code, details = self.first, grpc.StatusCode.OK, ""
        try:
            while message is not EOF:
                await send({"type": "http.response.body", "body": sse_event(to_json(message)), "more_body": True})
                message = await self.call.read()
            trailing = await self.call.trailing_metadata()
        except grpc.aio.AioRpcError as error:
            code, details, trailing = error.code(), error.details() or "", error.trailing_metadata()
        status = error_body(code, details, request_id_in(trailing, self.request_id))
        await send({"type": "http.response.body", "body": sse_event(json.dumps(status).encode(), "status"),
                    "more_body": False})
