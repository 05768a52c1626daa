"""grpc.aio server interceptors: RPC metrics, request ids, last-resort error mapping, bearer-token auth.

grpc.aio interceptors only see the method name and metadata, not the call; to observe the outcome
each interceptor wraps the handler's behaviour (unary or streaming) in a function of the same shape.
`build_interceptors` returns them outermost first, so metrics also count auth rejections and the
request id is set before anything logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hmac
import inspect
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from core.errors import InvalidRequest, ServiceError
from service.config import ServerConfig
from service.metrics import GRPC, TRANSPORTS, Metrics
from service.status import to_status

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
AUTHORIZATION_KEY = "authorization"
TRANSPORT_KEY = "x-featurewire-transport"
"""Set to `http` by the HTTP/JSON gateway and to `openai` by the OpenAI-compatible API on the calls they make;
only the metrics' `transport` label reads it."""
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# Before an error status ends a request-streaming RPC: requests read and dropped at most, and the longest wait for
# the next one (see drain_requests).
DRAIN_LIMIT = 1024
DRAIN_IDLE_S = 0.25

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("featurewire_request_id", default="-")

Behaviour = Callable[[Any, grpc.aio.ServicerContext], Any]
Wrapper = Callable[[Behaviour, bool], Behaviour]
"""Given the original behaviour and whether it streams responses, return one of the same shape."""


def current_request_id() -> str:
    """The id of the RPC being handled on this task, or "-" outside one."""
    return request_id_var.get()


def is_safe_request_id(value: str | None) -> bool:
    """Whether RequestIdInterceptor keeps a caller's `x-request-id` as it is (else it makes a new one)."""
    return value is not None and _SAFE_REQUEST_ID.fullmatch(value) is not None


class RequestIdFilter(logging.Filter):
    """Adds `%(request_id)s` to every log record, so engine logs can be joined to an RPC."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def _metadata(details: grpc.HandlerCallDetails, key: str) -> str | None:
    for item in details.invocation_metadata or ():
        if item.key == key:
            return item.value.decode("latin-1") if isinstance(item.value, bytes) else item.value
    return None


def _wrap(handler: grpc.RpcMethodHandler | None, wrapper: Wrapper, *, always: bool = False,
          tolerant: bool = False) -> Any:
    """Rebuild `handler` with its behaviour passed through `wrapper`.

    Sync behaviours (run by grpc.aio on a thread pool) are left untouched unless `always`, which a
    wrapper that replaces the behaviour outright (auth denial) asks for. `tolerant` makes the request
    deserializer return `Undecodable` instead of raising (see DecodeInterceptor).
    """
    if handler is None:
        return None
    kinds = {
        (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
        (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
        (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
        (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
    }
    attribute, factory = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    behaviour = getattr(handler, attribute)
    if not (always or inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)):
        return handler
    deserializer = _tolerant(handler.request_deserializer) if tolerant else handler.request_deserializer
    return factory(wrapper(behaviour, bool(handler.response_streaming)),
                   request_deserializer=deserializer,
                   response_serializer=handler.response_serializer)


Leave = Callable[[Any, grpc.aio.ServicerContext, BaseException | None], Awaitable[None] | None]


def _around(behaviour: Behaviour, enter: Callable[[Any, grpc.aio.ServicerContext], Any], leave: Leave) -> Behaviour:
    """Run `enter` before and `leave(state, context, error)` after a behaviour of any async shape.

    grpc.aio treats an async generator as a streaming handler and a coroutine function as either a
    unary handler or a streaming one that uses `context.write`, so the wrapper keeps that shape.
    `leave` may swallow the error by returning normally after aborting (it gets the exception). `enter` gets the
    request (an async iterator of them for a request-streaming RPC) and the context.
    """

    async def finish(state: Any, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        result = leave(state, context, error)
        if inspect.isawaitable(result):
            await result

    if inspect.isasyncgenfunction(behaviour):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            state = enter(request, context)
            try:
                async for response in behaviour(request, context):
                    yield response
            except BaseException as error:
                await finish(state, context, error)
                raise
            await finish(state, context, None)
        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        state = enter(request, context)
        try:
            result = await behaviour(request, context)
        except BaseException as error:
            await finish(state, context, error)
            raise
        await finish(state, context, None)
        return result
    return call


def outcome_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status the client will see, from what the behaviour did to the context and how it ended."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if error is None or isinstance(error, grpc.aio.AbortError):
        return grpc.StatusCode.OK
    if isinstance(error, GeneratorExit):  # a stream closed early because the call went away
        return grpc.StatusCode.CANCELLED
    if isinstance(error, asyncio.CancelledError):
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC by method, final code and transport, observes its latency and tracks in-flight calls.

    The transport is the call's `x-featurewire-transport` (`http` from the gateway, `openai` from the OpenAI-compatible
    API) when it is one of TRANSPORTS, else grpc.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        method = details.method
        metrics = self.metrics
        given = _metadata(details, TRANSPORT_KEY)
        transport = given if given in TRANSPORTS else GRPC

        def enter(_: Any, context: grpc.aio.ServicerContext) -> float:
            metrics.track_in_flight(method, 1)
            return time.perf_counter()

        def leave(start: float, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
            metrics.track_in_flight(method, -1)
            metrics.observe_rpc(method, outcome_code(context, error), time.perf_counter() - start, transport)

        handler = await continuation(details)
        if handler is None:  # grpc answers UNIMPLEMENTED without running anything
            metrics.observe_rpc(method, grpc.StatusCode.UNIMPLEMENTED, 0.0, transport)
        return _wrap(handler, lambda behaviour, _: _around(behaviour, enter, leave))


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    """Takes `x-request-id` from the caller (when it is short and safe to log) or makes one.

    The id is set in a contextvar for the handler's task and returned in trailing metadata, so a
    client can quote it when reporting a failure.
    """

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        given = _metadata(details, REQUEST_ID_KEY)
        request_id = given if given is not None and is_safe_request_id(given) else uuid.uuid4().hex

        def enter(_: Any, context: grpc.aio.ServicerContext) -> contextvars.Token[str]:
            context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
            return request_id_var.set(request_id)

        def leave(token: contextvars.Token[str], context: grpc.aio.ServicerContext, error: Any) -> None:
            with contextlib.suppress(ValueError):  # a stream finalised in another context: nothing to restore
                request_id_var.reset(token)

        return _wrap(await continuation(details), lambda behaviour, _: _around(behaviour, enter, leave))


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Last-resort mapping of exceptions a servicer did not handle itself.

    `ServiceError` subclasses get their code from `service/status.py`; anything else becomes INTERNAL
    "internal error" with the traceback logged under the request id (grpc's default would send the
    exception text, which may contain internals, as UNKNOWN).
    """

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        method = details.method
        handler = await continuation(details)
        streaming_requests = handler is not None and bool(handler.request_streaming)

        def enter(request: Any, _: grpc.aio.ServicerContext) -> Any:
            return request if streaming_requests else None

        async def leave(requests: Any, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
            if error is None or not isinstance(error, Exception) or isinstance(error, grpc.aio.AbortError):
                return
            code, message = to_status(error)
            if not isinstance(error, ServiceError):
                log.error("unhandled error in %s [request %s]", method, current_request_id(), exc_info=error)
            if requests is not None:
                await drain_requests(requests)
            await context.abort(code, message)  # raises AbortError, replacing the original exception

        return _wrap(handler, lambda behaviour, _: _around(behaviour, enter, leave))


async def drain_requests(requests: Any, *, idle_s: float = DRAIN_IDLE_S, limit: int = DRAIN_LIMIT) -> int:
    """Read (and drop) the requests a client is still sending before a request-streaming RPC ends with an error.

    Why: a server that sends its status while the client is still writing makes grpc.aio clients report
    "INTERNAL: Internal error from Core" instead of that status (a write failing after the call ended overwrites
    the status the client already received: grpc/grpc#36066). Reading until the client half-closes means the
    status is sent only once no write can race with it. A client that waits for a response before writing its
    next request sends nothing more, so the drain stops after `idle_s` without a message; `limit` bounds the
    work a client that never stops writing can cause. Returns the number of requests dropped.
    """
    iterator = aiter(requests)
    dropped = 0
    while dropped < limit:
        try:
            await asyncio.wait_for(anext(iterator), idle_s)
        except (StopAsyncIteration, TimeoutError, grpc.RpcError, asyncio.InvalidStateError):
            break
        except Exception:  # a request that does not parse is dropped like the others
            pass
        dropped += 1
    return dropped


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>`; compares in constant time; never logs the token."""

    def __init__(self, token: str, *, exempt_prefixes: Sequence[str] = ()) -> None:
        if not token:
            raise ValueError("AuthInterceptor needs a non-empty token")
        self._expected = f"bearer {token}".encode()
        self._exempt = tuple(exempt_prefixes)

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._exempt):
            return handler
        reason = self._check(_metadata(details, AUTHORIZATION_KEY))
        if reason is None:
            return handler
        method = details.method

        streaming_requests = bool(handler.request_streaming)

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            log.info("rejected %s [request %s]: %s", method, current_request_id(), reason)
            if streaming_requests:
                await drain_requests(request)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

        return _wrap(handler, lambda behaviour, streaming: deny, always=True)

    def _check(self, header: str | None) -> str | None:
        """None when the header carries the token, else the reason sent back (never the token)."""
        if not header:
            return "missing credentials: send metadata 'authorization: Bearer <token>'"
        scheme, _, _ = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return "unsupported authorization scheme: use 'authorization: Bearer <token>'"
        presented = b"bearer " + header.strip()[len(scheme):].strip().encode("utf-8", "replace")
        if not hmac.compare_digest(presented, self._expected):
            return "invalid bearer token"
        return None


class Undecodable:
    """What a request message that does not parse becomes (bad UTF-8 in a string field, a corrupt encoding)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """grpc answers a deserializer's exception with UNKNOWN and the exception text (INTERNAL in a request
    stream); returning a marker instead lets DecodeInterceptor answer INVALID_ARGUMENT."""
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError; its text names the message type and the defect
            return Undecodable(f"{exc!s:.300}")
    return decode


def _parsed(request: Any) -> Any:
    if isinstance(request, Undecodable):
        raise InvalidRequest(f"the request message cannot be parsed: {request.reason}")
    return request


class DecodeInterceptor(grpc.aio.ServerInterceptor):
    """Innermost: a request that does not parse is INVALID_ARGUMENT (after auth), never UNKNOWN or INTERNAL."""

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        in_stream = bool(handler.request_streaming)

        async def messages(requests: Any) -> Any:
            async for request in requests:
                yield _parsed(request)

        def check(behaviour: Behaviour, _: bool) -> Behaviour:
            if inspect.isasyncgenfunction(behaviour):
                async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                    request = messages(request) if in_stream else _parsed(request)
                    async with contextlib.aclosing(behaviour(request, context)) as responses:
                        async for response in responses:
                            yield response
                return stream

            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                return await behaviour(messages(request) if in_stream else _parsed(request), context)
            return call

        return _wrap(handler, check, tolerant=True)


def build_interceptors(config: ServerConfig, metrics: Metrics | None) -> list[grpc.aio.ServerInterceptor]:
    """The server's interceptor chain, outermost first: metrics, request id, errors, auth, decoding."""
    chain: list[grpc.aio.ServerInterceptor] = []
    if metrics is not None:
        chain.append(MetricsInterceptor(metrics))
    chain += [RequestIdInterceptor(), ErrorInterceptor()]
    if config.auth_enabled:
        exempt = (HEALTH_PREFIX, *REFLECTION_PREFIXES) if config.auth_exempt_health else ()
        chain.append(AuthInterceptor(config.auth_token, exempt_prefixes=exempt))
    chain.append(DecodeInterceptor())
    return chain
