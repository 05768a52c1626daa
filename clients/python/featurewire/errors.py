"""One exception per gRPC status code the service sends, mirroring `service/status.py` on the server.

Callers catch what they can act on (`NotFound` for a typo in a stage name, `Unavailable` to try
another replica, `ResourceExhausted` to back off) instead of inspecting `grpc.RpcError` codes. Every
error keeps the server's message (it names the offending field and its allowed range), the status
code's name, the RPC and the server's request id (quote it when reporting a failure).
"""

from __future__ import annotations

from typing import Any

import grpc

REQUEST_ID_KEY = "x-request-id"


class FeaturewireError(Exception):
    """Base of every error the client raises for a failed call."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    retryable: bool = False

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, method: str = "",
                 request_id: str = "") -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.method = method
        self.request_id = request_id

    @property
    def status(self) -> str:
        """The status code's name, e.g. "NOT_FOUND"."""
        return self.code.name

    def __str__(self) -> str:
        if not self.method:
            return f"{self.status}: {self.message}"
        request = f", request {self.request_id}" if self.request_id else ""
        return f"{self.status}: {self.message} [{self.method}{request}]"


class InvalidArgument(FeaturewireError):
    """Malformed request: the message names the field and its allowed range (INVALID_ARGUMENT)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(FeaturewireError):
    """Unknown stack, stage, hookpoint, or a feature id >= d_sae (NOT_FOUND)."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(FeaturewireError):
    """A valid request the server cannot run in its state, e.g. no stack loaded (FAILED_PRECONDITION)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(FeaturewireError):
    """Server loading, draining or unreachable; idempotent calls are retried with backoff (UNAVAILABLE)."""

    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


class ResourceExhausted(FeaturewireError):
    """Queue full, out of memory or a message over the size limit; retry later or smaller (RESOURCE_EXHAUSTED)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(FeaturewireError):
    """The call's deadline passed before or during the work (DEADLINE_EXCEEDED)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(FeaturewireError):
    """An RPC this server's serving mode does not offer; see `ServerInfo.capabilities.rpcs` (UNIMPLEMENTED)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Unauthenticated(FeaturewireError):
    """No bearer token, or a wrong one, for a server that requires it (UNAUTHENTICATED)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(FeaturewireError):
    """The credentials are valid but not allowed this call (PERMISSION_DENIED; from proxies in front)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Cancelled(FeaturewireError):
    """The call was cancelled (CANCELLED)."""

    code = grpc.StatusCode.CANCELLED


class Internal(FeaturewireError):
    """A server bug; the server logged the traceback under the request id (INTERNAL, UNKNOWN, DATA_LOSS)."""

    code = grpc.StatusCode.INTERNAL


ERRORS: dict[grpc.StatusCode, type[FeaturewireError]] = {
    cls.code: cls
    for cls in (InvalidArgument, NotFound, FailedPrecondition, Unavailable, ResourceExhausted, DeadlineExceeded,
                Unimplemented, Unauthenticated, PermissionDenied, Cancelled, Internal)
}
ERRORS[grpc.StatusCode.UNKNOWN] = Internal
ERRORS[grpc.StatusCode.DATA_LOSS] = Internal


def _request_id(error: Any) -> str:
    trailing = getattr(error, "trailing_metadata", None)
    try:
        items = trailing() if callable(trailing) else ()
    except Exception:  # a failed call may have no metadata to give
        return ""
    for key, value in items or ():
        if key == REQUEST_ID_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


def from_rpc_error(error: grpc.RpcError, method: str = "") -> FeaturewireError:
    """The exception for a failed call (a sync `grpc.RpcError` or a `grpc.aio.AioRpcError`)."""
    code_of = getattr(error, "code", None)
    code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    details_of = getattr(error, "details", None)
    message = (details_of() if callable(details_of) else None) or str(error) or code.name
    cls = ERRORS.get(code, FeaturewireError)
    return cls(message, code=code, method=method, request_id=_request_id(error))

