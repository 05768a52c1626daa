"""The OpenAI-compatible routes under `/openai/v1` on the HTTP port: models, completions, chat completions.

Like the gateway, not a second implementation: a completion is one Generate call per choice over the same
loopback gRPC channel to the server's own listener, so the queue, continuous batching (steered and plain
streams share batches), limits, validation, bearer-token auth, request ids, drain (503) and metrics are the
gRPC server's; the calls carry `x-featurewire-transport: openai`, the metrics' transport label. A client that
disconnects cancels its calls (service/http/openai/stream.py).

The base URL an SDK takes is `http(s)://HOST:HTTP_PORT/openai/v1`: under its own prefix, so no route can clash
with the gateway's `POST /v1/<Method>`. Model ids (GET /models): the host model's name (the bare model: the
default stack for edits, or none) and `<model>:<stack>` for each stack; `featurewire.stack` may name the
stack instead, but must then agree with the model id.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import grpc
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import types_pb2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.config import ServerConfig
from service.http.codes import TIMEOUT_HEADER, TIMEOUT_QUERY, BadTimeout, parse_timeout
from service.http.incoming import call_metadata, caller_request_id, read_body
from service.http.openai.chat import load_template, render
from service.http.openai.choices import Answer
from service.http.openai.errors import OpenAIError, bad_request, error_response, from_rpc_error
from service.http.openai.fields import CHAT, COMPLETION, parse_request
from service.http.openai.fields import Request as Parsed
from service.http.openai.models import NO_MODEL, ModelCatalog
from service.http.openai.stream import ChunkStream, start_calls
from service.interceptors import REQUEST_ID_KEY
from service.metrics import OPENAI

log = logging.getLogger(__name__)

BASE_PATH = "/openai/v1"
SERVICE = "/featurewire.v1.Featurewire"
BODY_LIMIT_FACTOR = 4  # as the gateway: JSON is a few times its protobuf encoding (max_message_bytes)


class OpenAIFace:
    """The Starlette app mounted at BASE_PATH; `bind` gives it the gateway's loopback channel."""

    def __init__(self, config: ServerConfig, tokenizer: Callable[[], Any] | None = None) -> None:
        self.config = config
        self.limits = config.limits()
        self.max_choices = config.max_batch_size
        self.max_body_bytes = BODY_LIMIT_FACTOR * config.max_message_bytes
        self.template = load_template(config.chat_template)
        self._tokenizer = tokenizer
        self._generate: Any = None
        self.catalog = ModelCatalog()
        self.app = Starlette(routes=[
            Route("/models", self._models, methods=["GET"]),
            Route("/models/{model:path}", self._model, methods=["GET"]),
            Route("/completions", self._completions, methods=["POST"]),
            Route("/chat/completions", self._chat, methods=["POST"]),
        ], exception_handlers={HTTPException: self._http_error, Exception: self._internal_error})

    def bind(self, channel: grpc.aio.Channel) -> None:
        self._generate = channel.unary_stream(
            f"{SERVICE}/Generate", request_serializer=pb.GenerateRequest.SerializeToString,
            response_deserializer=pb.GenerateResponse.FromString)
        self.catalog.bind(channel.unary_unary(
            f"{SERVICE}/GetServerInfo", request_serializer=pb.GetServerInfoRequest.SerializeToString,
            response_deserializer=pb.GetServerInfoResponse.FromString))

    # -- routes --------------------------------------------------------------------------------------------
    async def _models(self, request: Request) -> Response:
        request_id = caller_request_id(request)
        try:
            models = await self.catalog.fetch(call_metadata(request, request_id, OPENAI), _timeout(request))
        except OpenAIError as error:
            return error_response(error, request_id)
        return _json({"object": "list", "data": models.entries()}, request_id)

    async def _model(self, request: Request) -> Response:
        request_id = caller_request_id(request)
        try:
            models = await self.catalog.fetch(call_metadata(request, request_id, OPENAI), _timeout(request))
            entry = models.entry(request.path_params["model"])
        except OpenAIError as error:
            return error_response(error, request_id)
        return _json(entry, request_id)

    async def _completions(self, request: Request) -> Response:
        return await self._answer(request, COMPLETION)

    async def _chat(self, request: Request) -> Response:
        return await self._answer(request, CHAT)

    async def _answer(self, request: Request, kind: str) -> Response:
        request_id = caller_request_id(request)
        metadata = call_metadata(request, request_id, OPENAI)
        try:
            timeout = _timeout(request)
            parsed = parse_request(kind, _json_body(await read_body(request, self.max_body_bytes)), self.limits,
                                   self.max_choices)
            stack = await self.catalog.stack_for(parsed.model, parsed.steering.request.stack, metadata, timeout)
            if kind == CHAT:
                parsed = self._render_chat(parsed)
            calls = [self._generate(r, timeout=timeout, metadata=metadata) for r in _requests(parsed, stack)]
        except OpenAIError as error:
            return error_response(error, request_id)
        answer = Answer(parsed, parsed.model, request_id, self._token_text)
        started = await start_calls(calls, request.receive)
        if started is None:
            return Response(status_code=499)  # the client went away; nobody reads this
        if isinstance(started, grpc.aio.AioRpcError):
            return error_response(from_rpc_error(started), request_id)
        for index, header in enumerate(started):
            answer.on_header(index, header)
        if parsed.stream:
            return ChunkStream(calls, answer, request_id)
        return await self._whole(calls, answer, request, request_id)

    async def _whole(self, calls: list[Any], answer: Answer, request: Request, request_id: str) -> Response:
        """Read every call to its end (the client going away cancels them) and answer one JSON body."""
        async def read(index: int, call: Any) -> None:
            while (message := await call.read()) is not grpc.aio.EOF:
                answer.on_event(index, message)

        work = asyncio.gather(*(read(i, c) for i, c in enumerate(calls)))
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait((work, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not work.done():
                for call in calls:
                    call.cancel()
                work.cancel()
        if work.cancelled():
            return Response(status_code=499)
        error = work.exception()
        if isinstance(error, grpc.aio.AioRpcError):
            for call in calls:
                call.cancel()
            return error_response(from_rpc_error(error), request_id)
        if error is not None:
            raise error
        return _json(answer.response(), request_id)

    def _render_chat(self, parsed: Parsed) -> Parsed:
        tokenizer = self._loaded_tokenizer()
        text = render(tokenizer, self.template, parsed.messages)
        prompt = types_pb2.Input(text=text, add_special_tokens=False)
        return Parsed(**{**parsed.__dict__, "prompts": (prompt,), "echo_texts": (None,)})

    def _loaded_tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise OpenAIError(501, NO_MODEL)
        tokenizer = self._tokenizer()
        if tokenizer is None:
            raise OpenAIError(503, "the server is starting (loading the model); retry shortly")
        return tokenizer

    def _token_text(self, token_id: int) -> str:
        return str(self._loaded_tokenizer().decode([token_id], skip_special_tokens=False))

    # -- errors --------------------------------------------------------------------------------------------
    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = exc.detail
        if exc.status_code == 404:
            message = (f"no route {request.url.path!r}: the OpenAI-compatible API has GET {BASE_PATH}/models, "
                       f"POST {BASE_PATH}/completions and POST {BASE_PATH}/chat/completions")
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path!r}"
        return error_response(OpenAIError(exc.status_code, message), caller_request_id(request),
                              dict(exc.headers or {}))

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        request_id = caller_request_id(request)
        log.error("OpenAI API error on %s [request %s]", request.url.path, request_id, exc_info=exc)
        return error_response(OpenAIError(500, "internal error"), request_id)


def _requests(parsed: Parsed, stack: str) -> list[pb.GenerateRequest]:
    """One GenerateRequest per steered choice: prompt p's n samples, sample j seeded seed + j when a seed is given."""
    out = []
    for prompt in parsed.prompts:
        for j in range(parsed.n):
            request = pb.GenerateRequest()
            request.CopyFrom(parsed.steering.request)
            request.stack = stack
            request.prompt.CopyFrom(prompt)
            request.sampling.CopyFrom(parsed.sampling)
            if parsed.sampling.HasField("seed"):
                request.sampling.seed = (parsed.sampling.seed + j) % 2**64
            out.append(request)
    return out


def _json_body(body: bytes) -> Any:
    if not body.strip():
        raise bad_request("the request body is empty; send a JSON object")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # bad JSON or bad UTF-8
        raise bad_request(f"the request body is not valid JSON ({exc})") from None


def _timeout(request: Request) -> float | None:
    try:
        return parse_timeout(request.headers.get(TIMEOUT_HEADER), request.query_params.get(TIMEOUT_QUERY))
    except BadTimeout as exc:
        raise bad_request(str(exc)) from None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _json(body: dict[str, Any], request_id: str) -> Response:
    return Response(json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode(), 200,
                    {REQUEST_ID_KEY: request_id}, "application/json")
