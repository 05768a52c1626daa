"""What both HTTP faces (the gateway and the OpenAI-compatible API) read from a request before calling gRPC:
the request id, the metadata each loopback call carries, and the body under a size limit.

Shared so that auth, request ids and the metrics' transport label travel the same way whichever face the
request came in by (service/http/gateway.py, service/http/openai/).
"""

from __future__ import annotations

import uuid

from starlette.exceptions import HTTPException
from starlette.requests import Request

from service.interceptors import AUTHORIZATION_KEY, REQUEST_ID_KEY, TRANSPORT_KEY, is_safe_request_id


def caller_request_id(request: Request) -> str:
    """The caller's `x-request-id` when the server would keep it (RequestIdInterceptor), else a new one like its."""
    given = request.headers.get(REQUEST_ID_KEY)
    return given if given is not None and is_safe_request_id(given) else uuid.uuid4().hex


def call_metadata(request: Request, request_id: str, transport: str) -> tuple[tuple[str, str], ...]:
    """The metadata of a loopback call: the transport label, the request id and the caller's `authorization`."""
    items = [(TRANSPORT_KEY, transport), (REQUEST_ID_KEY, request_id)]
    authorization = request.headers.get(AUTHORIZATION_KEY)
    if authorization and authorization.isascii() and authorization.isprintable():  # else: as if none was sent
        items.append((AUTHORIZATION_KEY, authorization))
    return tuple(items)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused past `limit` bytes with an HTTPException 413 (each face renders it its own way)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the request body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
