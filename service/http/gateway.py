"""The HTTP/JSON gateway: every Featurewire RPC as `POST /v1/<Method>`, in the server's own process.

Not a second implementation: each HTTP request becomes one call over a grpc.aio channel to the server's
own gRPC listener on loopback, so validation, limits, queueing, auth, drain, request ids and metrics are
exactly the gRPC server's (its interceptors run on every call); the gateway only translates.

- Bodies and responses are the request and response messages in protobuf's proto3 JSON mapping
  (lowerCamelCase names; `json_format` also accepts the proto field names on input). An empty body is
  the empty request.
- Server-streaming RPCs answer `text/event-stream`: one `data:` event per response message, then
  `event: status` whose data is `{code, message, request_id}`. The first message is awaited before the
  headers go out, so an error before any message (unknown stage, bad field, full queue) still gets its
  HTTP status and a JSON error body; an error after it can only end the stream (its status event).
- EncodeActivations (bidirectional) takes a JSON array of requests (or one request object) and streams
  one response per request as above: HTTP/1.1 cannot interleave a request body with a streamed answer.
- Errors: the HTTP status of the gRPC code (service/http/codes.py) and `{code, message, request_id}`.
- Metadata sent with each call: `authorization` (from the header), `x-request-id` (the caller's when the
  server would keep it, else a fresh one, so a stream's headers can carry the id the server logs under),
  `x-featurewire-transport: http` (the metrics' transport label) and the deadline from `?timeout=`
  or `grpc-timeout` (none: the server's default applies, as for a gRPC client that sets none).
- A client that disconnects cancels its call (service/http/sse.py), streams or not.
- `GET /healthz` and `/readyz` are grpc.health.v1 checks of `liveness` and `readiness` over the same channel.
- `GET /` is the explorer, a static page (service/http/pages.py) that calls the routes above.
- `/openai/v1/...` is the OpenAI-compatible API (service/http/openai/), mounted here; it calls Generate and
  GetServerInfo through the same channel, with `x-featurewire-transport: openai`.

uvicorn runs as a task on the server's event loop, on a socket bound here, without its signal handlers
(service/lifecycle.py owns SIGTERM: draining makes the gRPC calls, and so the HTTP requests, answer
UNAVAILABLE/503; `stop()` shuts uvicorn down once the gRPC server has stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import uvicorn
from featurewire.v1 import featurewire_pb2 as pb
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from core.errors import FailedPrecondition
from service.config import ServerConfig
from service.health import LIVENESS, READINESS, SERVING
from service.http.codes import (
    TIMEOUT_HEADER,
    TIMEOUT_QUERY,
    BadTimeout,
    code_for_http_status,
    error_body,
    http_status,
    parse_timeout,
)
from service.http.incoming import call_metadata, caller_request_id, read_body
from service.http.jsonmap import to_json
from service.http.openai.face import BASE_PATH, OpenAIFace
from service.http.pages import ExplorerFiles, explorer_page
from service.http.sse import GONE, EventStream, request_id_in, unless_gone
from service.interceptors import REQUEST_ID_KEY
from service.metrics import HTTP

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Featurewire"]
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_TIMEOUT_S = 5.0
SHUTDOWN_GRACE_S = 5.0  # uvicorn's wait for open connections once the gRPC server (and every call) has stopped
BODY_FACTOR = 4  # JSON of packed floats and ids is a few times its protobuf encoding (max_message_bytes)


class BadRequest(ValueError):
    """A body that is not JSON for the request message; answered 400 INVALID_ARGUMENT."""


@dataclass(frozen=True)
class Rpc:
    """One method of the service descriptor, as the gateway calls it."""

    name: str
    path: str
    request_type: type[Message]
    response_type: type[Message]
    client_streaming: bool
    server_streaming: bool


def service_rpcs() -> dict[str, Rpc]:
    """Every RPC of featurewire.v1.Featurewire, from the descriptor (so a new RPC is routed without a change)."""
    return {m.name: Rpc(m.name, f"/{SERVICE.full_name}/{m.name}", GetMessageClass(m.input_type),
                        GetMessageClass(m.output_type), m.client_streaming, m.server_streaming)
            for m in SERVICE.methods}


def parse_body(rpc: Rpc, body: bytes) -> list[Message]:
    """The request message(s) of a JSON body: one object, or for a client-streaming RPC an array of them."""
    what = rpc.request_type.DESCRIPTOR.full_name
    try:
        data = json.loads(body) if body.strip() else {}
    except (ValueError, RecursionError) as exc:  # bad JSON or bad UTF-8
        raise BadRequest(f"the request body is not valid JSON ({exc}); {rpc.name} takes a JSON {what}") from None
    items = data if rpc.client_streaming and isinstance(data, list) else [data]
    messages = []
    for index, item in enumerate(items):
        where = f" (item {index})" if rpc.client_streaming and isinstance(data, list) else ""
        if not isinstance(item, dict):
            raise BadRequest(f"the request body{where} must be a JSON object ({what}), got {type(item).__name__}")
        try:
            messages.append(json_format.ParseDict(item, rpc.request_type()))
        except Exception as exc:  # json_format.ParseError mostly; anything it raises means the JSON does not fit
            raise BadRequest(f"the request body{where} is not valid JSON for {what}: {exc}") from None
    return messages


def json_response(body: bytes | dict[str, Any], status: int, request_id: str,
                  headers: dict[str, str] | None = None) -> Response:
    content = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    return Response(content, status, {REQUEST_ID_KEY: request_id, **(headers or {})}, "application/json")


def error_response(code: grpc.StatusCode, message: str, request_id: str, status: int | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    extra = dict(headers or {})
    if code is grpc.StatusCode.UNAUTHENTICATED:
        extra.setdefault("www-authenticate", "Bearer")
    return json_response(error_body(code, message, request_id), status or http_status(code), request_id, extra)


def rpc_error_response(error: grpc.aio.AioRpcError, request_id: str) -> Response:
    return error_response(error.code(), error.details() or "", request_id_in(error.trailing_metadata(), request_id))


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: the server's lifecycle handles SIGTERM/SIGINT (and drains first)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpGateway:
    """The Starlette app, its uvicorn server and the loopback channel; start and stop on the server's loop."""

    def __init__(self, config: ServerConfig, target: str, tokenizer: Callable[[], Any] | None = None) -> None:
        self.config = config
        self.target = target
        self.rpcs = service_rpcs()
        self.port: int | None = None
        self.max_body_bytes = BODY_FACTOR * config.max_message_bytes
        self._channel: grpc.aio.Channel | None = None
        self._calls: dict[str, Any] = {}
        self._check: Any = None
        self._server: _Uvicorn | None = None
        self._task: asyncio.Future[None] | None = None
        self.openai = OpenAIFace(config, tokenizer)  # the OpenAI-compatible API under BASE_PATH
        self.app = Starlette(routes=[
            Mount(BASE_PATH, app=self.openai.app, name="openai"),
            Route("/v1/{method}", self._rpc, methods=["POST"]),
            Route("/healthz", self._liveness, methods=["GET"]),
            Route("/readyz", self._readiness, methods=["GET"]),
            Route("/", explorer_page, methods=["GET", "HEAD"]),
            Mount("/static", app=ExplorerFiles(), name="explorer"),
        ], exception_handlers={HTTPException: self._http_error, Exception: self._internal_error})

    async def start(self) -> int:
        """Open the channel, bind `host:http_port` and serve; returns the bound port."""
        assert self.config.http_port is not None
        limit = self.config.max_message_bytes
        self._channel = grpc.aio.insecure_channel(self.target, options=[
            ("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit),
            ("grpc.enable_http_proxy", 0), ("grpc.primary_user_agent", "featurewire-http-gateway")])
        kinds = {(False, False): self._channel.unary_unary, (False, True): self._channel.unary_stream,
                 (True, False): self._channel.stream_unary, (True, True): self._channel.stream_stream}
        self._calls = {rpc.name: kinds[(rpc.client_streaming, rpc.server_streaming)](
            rpc.path, request_serializer=rpc.request_type.SerializeToString,
            response_deserializer=rpc.response_type.FromString) for rpc in self.rpcs.values()}
        self._check = self._channel.unary_unary(
            HEALTH_CHECK, request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString)
        self.openai.bind(self._channel)
        cert, key = self.config.tls_cert, self.config.tls_key  # HTTPS with the gRPC listener's certificate
        config = uvicorn.Config(
            self.app, http="h11", ws="none", lifespan="off", log_config=None, log_level="warning", access_log=False,
            server_header=False, timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
            ssl_certfile=str(cert) if cert else None, ssl_keyfile=str(key) if key else None)
        try:
            config.load()  # TLS files are read here: a bad one fails startup with its reason
        except (OSError, ValueError) as exc:
            raise FailedPrecondition(f"cannot start the HTTP gateway: {exc}") from None
        sock = bind_socket(self.config.host, self.config.http_port)
        self.port = sock.getsockname()[1]
        self._server = server = _Uvicorn(config)
        self._task = asyncio.ensure_future(self._serve(server, sock))
        while not server.started:
            if self._task.done():
                self._task.result()
                raise FailedPrecondition("the HTTP gateway stopped while starting (see the log)")
            await asyncio.sleep(0.005)
        return self.port

    async def _serve(self, server: _Uvicorn, sock: socket.socket) -> None:
        try:
            await server.serve(sockets=[sock])
        except SystemExit:  # uvicorn exits the process on some startup errors; here it only stops the gateway
            log.error("the HTTP gateway stopped")

    async def stop(self) -> None:
        """Close the listener and the idle connections, wait for open responses (briefly), close the channel."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(self._task), SHUTDOWN_GRACE_S + 5.0)
            except TimeoutError:
                log.warning("the HTTP gateway did not stop in time; closing what is left")
                self._server.force_exit = True
            except Exception:
                log.exception("the HTTP gateway failed")
        if self._channel is not None:
            await self._channel.close()
        self._server = self._task = self._channel = None

    # -- routes -----------------------------------------------------------------------------------------
    async def _rpc(self, request: Request) -> Response:
        request_id = _caller_request_id(request)
        name = request.path_params["method"]
        rpc = self.rpcs.get(name)
        if rpc is None:
            return error_response(grpc.StatusCode.NOT_FOUND, f"no RPC named {name!r}: POST /v1/<Method> with one of "
                                  f"{', '.join(self.rpcs)}", request_id)
        try:
            timeout = parse_timeout(request.headers.get(TIMEOUT_HEADER), request.query_params.get(TIMEOUT_QUERY))
            messages = parse_body(rpc, await self._body(request))
        except (BadRequest, BadTimeout) as exc:
            return error_response(grpc.StatusCode.INVALID_ARGUMENT, str(exc), request_id)
        argument = iter(messages) if rpc.client_streaming else messages[0]
        call = self._calls[name](argument, timeout=timeout, metadata=_metadata(request, request_id))
        try:
            result = await unless_gone(call.read() if rpc.server_streaming else call, call, request.receive)
        except grpc.aio.AioRpcError as error:
            return rpc_error_response(error, request_id)
        if result is GONE:
            return Response(status_code=499)  # nobody reads it
        if rpc.server_streaming:
            return EventStream(call, result, request_id)
        return json_response(to_json(result), 200, request_id_in(await call.trailing_metadata(), request_id))

    async def _body(self, request: Request) -> bytes:
        """The body, refused past `max_body_bytes` (a 413 with the usual JSON error body)."""
        return await read_body(request, self.max_body_bytes)

    async def _liveness(self, request: Request) -> Response:
        return await self._health(request, LIVENESS)

    async def _readiness(self, request: Request) -> Response:
        return await self._health(request, READINESS)

    async def _health(self, request: Request, service: str) -> Response:
        """200 when grpc.health.v1 says SERVING for `service`, 503 otherwise (and when the server is gone)."""
        request_id = _caller_request_id(request)
        try:
            timeout = parse_timeout(request.headers.get(TIMEOUT_HEADER), request.query_params.get(TIMEOUT_QUERY))
            response = await self._check(health_pb2.HealthCheckRequest(service=service),
                                         timeout=timeout or HEALTH_TIMEOUT_S, metadata=_metadata(request, request_id))
        except BadTimeout as exc:
            return error_response(grpc.StatusCode.INVALID_ARGUMENT, str(exc), request_id)
        except grpc.aio.AioRpcError as error:
            return rpc_error_response(error, request_id)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return json_response({"service": service, "status": status}, 200 if response.status == SERVING else 503,
                             request_id)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        """Routing and body-size errors in the same JSON shape as the RPC errors."""
        assert isinstance(exc, HTTPException)
        code = code_for_http_status(exc.status_code)
        message = exc.detail
        if exc.status_code == 404:
            message = (f"no route {request.url.path!r}: POST /v1/<Method>, GET /healthz, GET /readyz, "
                       f"GET / (the explorer) or the OpenAI-compatible API under {BASE_PATH}/")
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path!r}"
        return error_response(code, message, _caller_request_id(request), exc.status_code, dict(exc.headers or {}))

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        """A gateway bug: INTERNAL like the server's own last resort (service/interceptors.py), traceback logged."""
        request_id = _caller_request_id(request)
        log.error("HTTP gateway error on %s [request %s]", request.url.path, request_id, exc_info=exc)
        return error_response(grpc.StatusCode.INTERNAL, "internal error", request_id)


def _caller_request_id(request: Request) -> str:
    return caller_request_id(request)


def _metadata(request: Request, request_id: str) -> tuple[tuple[str, str], ...]:
    return call_metadata(request, request_id, HTTP)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on `host:port` (`[::]` takes IPv4 too, like the gRPC listener); in use fails loudly."""
    name = host.strip().strip("[]")
    candidates = [("::", socket.AF_INET6), ("0.0.0.0", socket.AF_INET)] if name in ("", "::") else [
        (name, socket.AF_UNSPEC)]
    reason = "no usable address"
    for address, family in candidates:
        try:
            family, kind, proto, _, sockaddr = socket.getaddrinfo(address, port, family, socket.SOCK_STREAM, 0,
                                                                  socket.AI_PASSIVE)[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:  # e.g. no IPv6 in this container: the IPv4 wildcard instead
            reason = exc.strerror or str(exc)
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may bind over TIME_WAIT
            if family == socket.AF_INET6 and address == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(sockaddr)
            sock.listen(1024)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise FailedPrecondition(f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}") from None
        return sock
    raise FailedPrecondition(f"cannot serve HTTP on {host}:{port}: {reason}")
