"""gRPC status ↔ HTTP: the status table, the error body, and the deadline a request asks for.

The table is grpc-gateway's (runtime.HTTPStatusFromCode), so an HTTP client of featurewire sees the same
statuses as one of any other gRPC service behind a gateway: a client error the caller must fix is 4xx
(INVALID_ARGUMENT, FAILED_PRECONDITION and OUT_OF_RANGE all 400), "retry later" is 429 or 503, a deadline
504, and a call the client itself cancelled 499 (nginx's "client closed request").

The error body is always `{"code": "<gRPC code name>", "message": ..., "request_id": ...}`: the gRPC code
name keeps the distinctions that collapse in HTTP (400 is three codes), and the request id is the one
the server logged the call under.
"""

from __future__ import annotations

import math
import re
from typing import Any

import grpc

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
"""gRPC code → HTTP status (grpc-gateway's table); every grpc.StatusCode is in it."""

# Statuses the HTTP layer answers by itself (routing, body size), as the gRPC code their body names.
_CODE_OF_HTTP: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# grpc-timeout units (the gRPC over HTTP/2 spec: at most 8 digits, then one unit letter).
_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_GRPC_TIMEOUT = re.compile(r"(\d{1,8})([HMSmun])")
TIMEOUT_HEADER = "grpc-timeout"
TIMEOUT_QUERY = "timeout"
MAX_TIMEOUT_S = 1e7
"""Longer deadlines (gRPC's form allows 99999999H, ~11,000 years) are capped at ~116 days: past a few centuries
the channel's deadline overflows its clock and the call fails at once with DEADLINE_EXCEEDED."""


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status a gRPC status code maps to (500 for anything unexpected)."""
    return HTTP_STATUS.get(code, 500)


def code_for_http_status(status: int) -> grpc.StatusCode:
    """The gRPC code named in the body of an error the HTTP layer answers itself (unknown route, body too large)."""
    if status in _CODE_OF_HTTP:
        return _CODE_OF_HTTP[status]
    return grpc.StatusCode.INVALID_ARGUMENT if 400 <= status < 500 else grpc.StatusCode.UNKNOWN


def error_body(code: grpc.StatusCode, message: str, request_id: str) -> dict[str, Any]:
    """`{"code", "message", "request_id"}`: the body of every error response and of a stream's status event."""
    return {"code": code.name, "message": message, "request_id": request_id}


class BadTimeout(ValueError):
    """A `grpc-timeout` header or `timeout` query parameter that is not a positive duration."""


def parse_timeout(header: str | None, query: str | None) -> float | None:
    """The call's deadline in seconds: `?timeout=<seconds>` wins over a `grpc-timeout` header, else None.

    The header takes gRPC's form (`30S`, `500m`, `2M`) or plain seconds (`30`, `0.5`); None means "no
    deadline from the client", so the server applies its default (`request_timeout_s`) exactly as for a
    gRPC client that sets none. Values beyond MAX_TIMEOUT_S become MAX_TIMEOUT_S.
    """
    if query is not None:
        return min(MAX_TIMEOUT_S, _seconds(query, f"the {TIMEOUT_QUERY} query parameter"))
    if header is None:
        return None
    match = _GRPC_TIMEOUT.fullmatch(header.strip())
    if match is not None:
        value = int(match.group(1)) * _UNITS[match.group(2)]
        if value <= 0:
            raise BadTimeout(f"the {TIMEOUT_HEADER} header must be a positive duration, got {header!r}")
        return min(MAX_TIMEOUT_S, value)
    return min(MAX_TIMEOUT_S, _seconds(header, f"the {TIMEOUT_HEADER} header"))


def _seconds(text: str, where: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise BadTimeout(f"{where} must be a number of seconds (or gRPC's form, e.g. 30S or 500m), "
                         f"got {text[:40]!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise BadTimeout(f"{where} must be a positive, finite number of seconds, got {text[:40]!r}")
    return value
