"""The one table from domain errors to gRPC status codes."""

from __future__ import annotations

import grpc

from core import errors

STATUS: dict[type[errors.ServiceError], grpc.StatusCode] = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.NotReady: grpc.StatusCode.UNAVAILABLE,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Unsupported: grpc.StatusCode.UNIMPLEMENTED,
}

INTERNAL_MESSAGE = "internal error"


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Return (code, message) for an exception; unknown errors never leak their text."""
    if isinstance(exc, errors.ServiceError):
        for cls in type(exc).__mro__:
            if cls in STATUS:
                return STATUS[cls], exc.message
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
