from __future__ import annotations

import grpc
import pytest

from core import errors
from service.status import INTERNAL_MESSAGE, STATUS, to_status


def _subclasses(cls: type) -> set[type]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= _subclasses(sub)
    return found


def test_every_domain_error_has_a_status_row():
    assert _subclasses(errors.ServiceError) <= set(STATUS)


@pytest.mark.parametrize(
    "exc, code",
    [
        (errors.InvalidRequest("bad top_k"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFound("no such stack"), grpc.StatusCode.NOT_FOUND),
        (errors.NotReady("loading"), grpc.StatusCode.UNAVAILABLE),
        (errors.Overloaded("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.Unsupported("no"), grpc.StatusCode.UNIMPLEMENTED),
    ],
)
def test_domain_errors_keep_their_message(exc, code):
    assert to_status(exc) == (code, exc.message)


def test_unexpected_errors_never_leak_their_text():
    assert to_status(KeyError("secret internals")) == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)

