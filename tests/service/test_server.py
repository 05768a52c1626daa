"""Server lifecycle through real gRPC: health while loading, serving, draining and stopped; fail-fast stacks;
TLS and bearer auth; message limits; reflection; and `featurewire-serve serve` under SIGTERM."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import featurewire_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import service.server as server_module
from core.errors import FailedPrecondition
from tests.server_process import launch
from tests.service.conftest import Running, make_server, server_config, slow_generation, start_server

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token"


def _code(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return excinfo.value.code()


def _generate(max_new_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt={"text": "The service must answer quickly"},
                              sampling=pb.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True))


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_health_follows_loading_ready_draining_and_stopped(server_loop, monkeypatch):
    """NOT_SERVING (alive) while loading, SERVING once warm, NOT_SERVING while an in-flight stream drains."""
    gate = threading.Event()
    real_load = server_module.load_host_model

    def slow_load(config):
        assert gate.wait(60)
        return real_load(config)

    monkeypatch.setattr(server_module, "load_host_model", slow_load)
    slow_generation(monkeypatch, 0.004)  # the stream below stays in flight for more than a second
    server = make_server(server_loop, server_config(None, drain_grace_s=30.0))
    starting = server_loop.submit(server.start())
    _wait_for(lambda: server.port is not None)
    channel = grpc.insecure_channel(server.target)
    running = Running(server, server_loop, channel, pb_grpc.FeaturewireStub(channel))
    try:
        assert (running.health(), running.health("liveness"), running.health("readiness")) == (
            "NOT_SERVING", "SERVING", "NOT_SERVING")
        with pytest.raises(grpc.RpcError) as err:
            running.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        assert _code(err) == grpc.StatusCode.UNAVAILABLE and "starting" in err.value.details()
        gate.set()
        starting.result(60)
        assert running.health() == running.health("readiness") == "SERVING"

        stream = running.stub.Generate(_generate(400), timeout=60)
        assert next(stream).HasField("header") and next(stream).HasField("token")
        server_loop.run(server.drain())
        assert (running.health(), running.health("liveness"), running.health("readiness")) == (
            "NOT_SERVING", "SERVING", "NOT_SERVING")
        with pytest.raises(grpc.RpcError) as err:
            running.stub.Tokenize(pb.TokenizeRequest(text="x"), timeout=10)
        assert _code(err) == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.value.details()

        stopping = server_loop.submit(server.stop())  # grace 30 s: the stream finishes well before
        rest = list(stream)
        assert rest[-1].finish.generated_tokens == 400
        assert rest[-1].finish.reason == pb.FINISH_REASON_LENGTH
        stopping.result(60)
        with pytest.raises(grpc.RpcError) as err:
            running.stub.Tokenize(pb.TokenizeRequest(text="x"), timeout=5)
        assert _code(err) == grpc.StatusCode.UNAVAILABLE
        assert server.health.statuses()["liveness"] == "NOT_SERVING"
    finally:
        gate.set()
        channel.close()


def test_a_stack_that_cannot_be_served_stops_startup(server_loop, tmp_path):
    (tmp_path / "stack.json").write_text("{not json")
    server = make_server(server_loop, server_config(tmp_path))
    with pytest.raises(FailedPrecondition, match="cannot serve the stack"):
        server_loop.run(server.start())
    assert server.health.statuses()["liveness"] == "NOT_SERVING"


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def secured(server_loop, tmp_path_factory):
    """TLS + bearer token, no stack, small messages."""
    tmp_path = tmp_path_factory.mktemp("tls")
    cert, key = _self_signed(tmp_path)
    config = server_config(None, tls_cert=cert, tls_key=key, auth_token=TOKEN, max_message_bytes=65536)
    running = start_server(server_loop, config, credentials=grpc.ssl_channel_credentials(cert.read_bytes()),
                           host_override="localhost")
    yield running
    running.stop()


def test_auth_needs_the_right_bearer_token(secured):
    request = pb.TokenizeRequest(text="hello")
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", f"Basic {TOKEN}"),)):
        with pytest.raises(grpc.RpcError) as err:
            secured.stub.Tokenize(request, metadata=metadata, timeout=10)
        assert _code(err) == grpc.StatusCode.UNAUTHENTICATED and TOKEN not in err.value.details()
    response = secured.stub.Tokenize(request, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10)
    assert response.tokens[0] == "<bos>"
    info = secured.stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert info.capabilities.auth_required and info.limits.max_message_bytes == 65536
    assert secured.health() == "SERVING"  # probes carry no token


def test_tls_only_and_message_size_limit(secured):
    with grpc.insecure_channel(secured.target) as plain, pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert _code(err) == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as err:
        secured.stub.Tokenize(pb.TokenizeRequest(text="x" * 70000), metadata=(("authorization", f"Bearer {TOKEN}"),),
                              timeout=10)
    assert _code(err) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_reflection_lists_the_services(served):
    stub = reflection_pb2_grpc.ServerReflectionStub(served.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                          timeout=10)
    names = {service.name for response in responses for service in response.list_services_response.service}
    assert {"featurewire.v1.Featurewire", "grpc.health.v1.Health"} <= names
    file_request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="featurewire.v1.Featurewire")
    (response,) = list(stub.ServerReflectionInfo(iter([file_request]), timeout=10))
    assert response.file_descriptor_response.file_descriptor_proto


def test_serve_flags_override_the_environment(monkeypatch, tmp_path):
    from service.cli import _server_config, build_parser

    (tmp_path / "token").write_text("tok-from-file\n")
    for name, value in {"PORT": "6000", "QUEUE_SIZE": "9", "STACKS": "a:b", "METRICS_PORT": "0"}.items():
        monkeypatch.setenv(f"FEATUREWIRE_{name}", value)
    args = build_parser().parse_args(["serve", "--port", "7000", "--stack", "x", "--stack", "y", "--auth-token-file",
                                      str(tmp_path / "token"), "--no-self-check", "--log-level", "debug"])
    config = _server_config(args)
    assert (config.port, config.queue_size, config.metrics_port) == (7000, 9, 0)
    assert config.stacks == (Path("x"), Path("y")) and config.auth_token == "tok-from-file"
    assert not config.self_check and config.log_level == "DEBUG"
    assert _server_config(build_parser().parse_args(["serve"])).stacks == (Path("a"), Path("b"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_drains_on_sigterm_and_exits_0():
    """The real CLI in a subprocess: ready, metrics over HTTP, SIGTERM → stopped, exit status 0."""
    metrics_port = _free_port()
    server = launch(["--model", "tiny-random", "--device", "cpu", "--host", "127.0.0.1", "--port", "0",
                     "--metrics-port", str(metrics_port), "--drain-grace", "5"], timeout=120)
    process, port, lines, reader = server.process, server.port, server.lines, server.reader
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            info = pb_grpc.FeaturewireStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
            assert info.model.name == "tiny-random" and not info.stacks
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert 'featurewire_rpcs_total{code="OK",method="GetServerInfo",transport="grpc"} 1.0' in scrape
        assert 'model="tiny-random"' in scrape and "featurewire_model_load_seconds" in scrape
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        reader.join(10)
        assert "featurewire stopped" in "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
