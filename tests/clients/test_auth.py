"""Bearer-token auth: as metadata on a plaintext channel, as call credentials over TLS."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import featurewire as fw
import grpc
import pytest
from featurewire._transport import Settings

from tests.clients.conftest import TOKEN
from tests.service.conftest import server_config, start_server


def test_the_token_is_required_and_sent_as_metadata(auth_server):
    for token in (None, "wrong"):
        with fw.Client(auth_server.target, token=token, retries=0) as client, pytest.raises(fw.Unauthenticated) as e:
            client.tokenize("hi")
        assert TOKEN not in str(e.value)
    with fw.Client(auth_server.target, token=TOKEN) as client:
        assert client.info().capabilities.auth_required and client.tokenize("hi").tokens[0] == "<bos>"

    async def run() -> None:
        async with fw.AsyncClient(auth_server.target, token=TOKEN) as client:
            assert (await client.tokenize("hi")).ids
        async with fw.AsyncClient(auth_server.target) as client:
            with pytest.raises(fw.Unauthenticated):
                await client.info()

    asyncio.run(run())


def test_token_placement():
    plain = Settings.build("localhost:1", token="t0k", tls=False, timeout=1.0, stream_timeout=1.0, options=(),
                           retries=0, metadata=(("x-request-id", "abc"),), load_balancing=None, keepalive_s=None)
    assert plain.credentials is None and plain.metadata == (("x-request-id", "abc"), ("authorization", "Bearer t0k"))
    secure = Settings.build("localhost:1", token="t0k", tls=True, timeout=1.0, stream_timeout=1.0, options=(),
                            retries=0, metadata=(), load_balancing=None, keepalive_s=None)
    assert isinstance(secure.credentials, grpc.ChannelCredentials) and secure.metadata == ()


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def test_tls_with_a_root_certificate_and_call_credentials(client_loop, tmp_path):
    cert, key = _self_signed(tmp_path)
    running = start_server(client_loop, server_config(None, tls_cert=cert, tls_key=key, auth_token=TOKEN),
                           credentials=grpc.ssl_channel_credentials(cert.read_bytes()))
    try:
        with fw.Client(running.target, tls=cert, token=TOKEN) as client:
            assert client.tokenize("hi").ids
        with fw.Client(running.target, tls=cert.read_bytes(), retries=0) as client, \
                pytest.raises(fw.Unauthenticated):
            client.tokenize("hi")
        with fw.Client(running.target, token=TOKEN, retries=0) as plain, pytest.raises(fw.Unavailable):
            plain.tokenize("hi", timeout=5)  # a plaintext client cannot talk to a TLS server
    finally:
        running.stop()
