"""Page tokens of SearchFeatures and ListFeatures: opaque strings the server signs, so a client can only resume a
query it was given a token for.

A token is base64url(offset ‖ HMAC-SHA256(key, query ‖ offset)[:16]), the key random per process. `query` is the
canonical form of the request's query fields (the validator builds it from resolved names: stack, stages, the
query itself, the filters and order; page_size is left out so a client may change it between pages). A token
altered, forged, made for another query or by another server process fails verification. Why sign rather than
store cursors: the server keeps no per-client state, and a token cannot make it read past what the query ranks.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from typing import Any

from core.errors import InvalidRequest

_PROCESS_KEY = secrets.token_bytes(32)
_OFFSET_BYTES, _MAC_BYTES = 8, 16
MAX_TOKEN_CHARS = 64


def canonical(*fields: Any) -> bytes:
    """The bytes a query's tokens are bound to: its fields as compact JSON (JSON-able values only)."""
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=True).encode("ascii")


class PageSigner:
    """Issues and checks page tokens with one key (the process's, unless a test gives another)."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = _PROCESS_KEY if key is None else key

    def _mac(self, query: bytes, offset: int) -> bytes:
        message = query + b"\x00" + offset.to_bytes(_OFFSET_BYTES, "big")
        return hmac.new(self._key, message, hashlib.sha256).digest()[:_MAC_BYTES]

    def token(self, query: bytes, offset: int) -> str:
        return self._encode(offset.to_bytes(_OFFSET_BYTES, "big") + self._mac(query, offset))

    @staticmethod
    def _encode(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    def offset(self, query: bytes, token: str, field: str = "page_token") -> int:
        """The offset a token carries; 0 for ""; InvalidRequest naming `field` for anything not issued here for
        `query`."""
        if not token:
            return 0
        refused = InvalidRequest(f"{field} was not issued by this server for this query: a page token is valid only "
                                 "with the same query fields (page_size may change), on the server process that "
                                 "issued it; leave it empty to start from the first page")
        if len(token) > MAX_TOKEN_CHARS or not token.isascii():
            raise refused
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise refused from None
        if len(raw) != _OFFSET_BYTES + _MAC_BYTES or self._encode(raw) != token:  # one spelling per token
            raise refused
        offset = int.from_bytes(raw[:_OFFSET_BYTES], "big")
        if not hmac.compare_digest(raw[_OFFSET_BYTES:], self._mac(query, offset)):
            raise refused
        return offset
