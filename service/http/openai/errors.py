"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the HTTP status its clients expect.

The status comes from the same table as the gateway's (service/http/codes.py, from the gRPC code the server's one
error table gives, service/status.py), so a request refused over gRPC is refused here with the same status and
message. `type` is OpenAI's error type for that status (the SDKs pick their exception class from the status:
BadRequestError, AuthenticationError, NotFoundError, RateLimitError, InternalServerError, ...); `code` is the
gRPC code name in lower case (`invalid_argument`, `not_found`, `resource_exhausted`, ...) or OpenAI's own code
where one exists (`model_not_found`); `param` names the request field at fault when it is known.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
from starlette.responses import Response

from service.http.codes import code_for_http_status, http_status
from service.interceptors import REQUEST_ID_KEY

ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled_error",
    500: "server_error",
    501: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}

FEATUREWIRE_KEYS = ("interventions", "steering_vectors", "conditions", "decompose", "stack", "stage", "feature")
"""Validator messages that start with one of these name a field of the request's `featurewire` object."""


class OpenAIError(Exception):
    """A request this face refuses before (or instead of) calling the server."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or ("internal" if status == 500 else code_for_http_status(status).name.lower())

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param)


def error_body(status: int, message: str, param: str | None, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error" if status >= 500
                                                                   else "invalid_request_error"),
                      "param": param, "code": code}}


def from_rpc_error(error: grpc.aio.AioRpcError, featurewire_param: str = "featurewire") -> OpenAIError:
    """The error a loopback call ended with, as OpenAI's clients read it."""
    code, message = error.code(), error.details() or ""
    param = None
    if message.startswith(("prompt", "input")):
        param = "prompt"
    elif message.startswith("sampling."):
        param = message.split(" ", 1)[0].removeprefix("sampling.")
    elif message.startswith(FEATUREWIRE_KEYS):
        param = featurewire_param
    return OpenAIError(http_status(code), message, param, code.name.lower())


def error_response(error: OpenAIError, request_id: str, headers: dict[str, str] | None = None) -> Response:
    extra = {REQUEST_ID_KEY: request_id, **(headers or {})}
    if error.status == 401:
        extra.setdefault("www-authenticate", "Bearer")
    return Response(json.dumps(error.body(), separators=(",", ":")).encode(), error.status, extra,
                    "application/json")
