"""Page tokens (contract/paging.py): what one signer issues for a query it accepts for that query only."""

from __future__ import annotations

import base64

import pytest

from core.errors import InvalidRequest
from service.engine.contract.paging import PageSigner, canonical
from service.engine.contract.search_validation import query_words

QUERY = canonical("ListFeatures", "tiny", "digest", 0, 0.0, 1.0, "density", False)


def test_a_token_round_trips_its_offset_for_its_query_only():
    signer = PageSigner(b"k" * 32)
    assert signer.offset(QUERY, "") == 0
    for offset in (0, 1, 20, 2**40):
        token = signer.token(QUERY, offset)
        assert signer.offset(QUERY, token) == offset and token.isascii() and "=" not in token
    token = signer.token(QUERY, 20)
    other = canonical("ListFeatures", "tiny", "digest", 0, 0.0, 1.0, "density", True)
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[7] ^= 1  # another offset under the same MAC
    forged = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    for bad_query, bad_token in ((other, token), (QUERY, forged), (QUERY, token + "A"), (QUERY, token[:-1]),
                                 (QUERY, " " + token), (QUERY, "é" * 10), (QUERY, "A" * 65)):
        with pytest.raises(InvalidRequest, match="^page_token was not issued by this server for this query"):
            signer.offset(bad_query, bad_token)
    with pytest.raises(InvalidRequest):  # another process's key
        PageSigner(b"j" * 32).offset(QUERY, token)
    assert PageSigner().offset(QUERY, PageSigner().token(QUERY, 3)) == 3  # one random key per process


def test_query_words_are_lower_case_and_distinct():
    assert query_words("Cat, cat! DOG-food 42") == ("cat", "dog", "food", "42")
    assert query_words("?! ...") == ()
