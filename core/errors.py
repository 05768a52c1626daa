"""Transport-free domain errors.

The engine raises these; `service/status.py` maps them to gRPC status codes in one table. Nothing
here imports grpc, so the engine, the trainer and the tests can use them freely.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error the service reports to a caller; `message` is safe to send."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(ServiceError):
    """Malformed input: bad value, bad shape, out-of-range index."""


class NotFound(ServiceError):
    """An unknown model, hookpoint, stack or feature."""


class FailedPrecondition(ServiceError):
    """A valid request that cannot run in the current state (e.g. CUDA asked for, none present)."""


class NotReady(ServiceError):
    """Still loading or warming up, or draining for shutdown; retry later."""


class Overloaded(ServiceError):
    """The queue is full or memory ran out; retry later or with a smaller request."""


class DeadlineExceeded(ServiceError):
    """Not enough time left to start or finish the work."""


class Unsupported(ServiceError):
    """Something this build does not implement (e.g. an unknown model architecture)."""

