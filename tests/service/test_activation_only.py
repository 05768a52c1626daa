"""The activation-only server (`serve --no-model`): ONNX Runtime sessions, no host model, no torch.

Its EncodeActivations gives the full server's codes for the same stack; GetServerInfo says what it serves
and everything else answers UNIMPLEMENTED with a reason; health, metrics and auth behave as in the full
server; a stack without graphs is refused at startup; the real CLI process never maps libtorch.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import featurewire_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core.errors import DeadlineExceeded, FailedPrecondition, Overloaded
from core.stack.manifest import read_summary
from service.activation_server import ActivationServer
from service.activation_servicer import EncodeWorker
from service.cli import main as serve_main
from service.config import ServerConfig
from service.engine.contract.encode_spec import EncodeSpec
from service.engine.stacks.onnx_runtime import CUDA, load_onnx_stack, providers_for
from tests.service.conftest import Running, ServerLoop, server_config, start_server
from tests.service.onnx_stacks import RESID, SIGNED, captured, encode_requests, write_resae_stack
from trainer.interop.onnx_export import export_stack

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token"


def start_activation_server(loop: ServerLoop, config: ServerConfig) -> Running:
    async def build() -> ActivationServer:
        return ActivationServer(config, device="cpu")

    server = loop.run(build())
    loop.run(server.start())
    channel = grpc.insecure_channel(server.target)
    return Running(server, loop, channel, pb_grpc.FeaturewireStub(channel))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def onnx_stack(tmp_path_factory: pytest.TempPathFactory, tiny_gemma) -> Path:
    return write_resae_stack(tmp_path_factory.mktemp("activation-only") / "stack", tiny_gemma)


@pytest.fixture(scope="module")
def activation_only(server_loop: ServerLoop, onnx_stack: Path) -> Iterator[Running]:
    running = start_activation_server(server_loop, server_config(onnx_stack))
    yield running
    running.stop()


def test_server_info_says_what_this_mode_serves(activation_only: Running, onnx_stack: Path) -> None:
    info = activation_only.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    caps = info.capabilities
    assert caps.mode == pb.SERVING_MODE_ACTIVATION_ONLY and caps.encode_backend == "onnxruntime:CPUExecutionProvider"
    assert list(caps.rpcs) == ["GetServerInfo", "ListStacks", "EncodeActivations"] and not caps.intervention_ops
    assert not info.HasField("model") and not info.hookpoints and info.versions.onnxruntime
    (stack,) = info.stacks
    summary = read_summary(onnx_stack)
    assert (stack.name, stack.digest, stack.path, stack.host_model) == ("resae", summary.digest, "stack", "tiny-random")
    assert [(s.name, s.d_in, s.d_sae, s.signed, s.HasField("residual_of")) for s in stack.stages] == [
        (SIGNED, 64, 96, True, False), (RESID, 64, 128, False, True)]
    assert stack.stages[1].residual_of == 0 and stack.stages[1].input_scale == pytest.approx(0.7)
    listed = activation_only.stub.ListStacks(pb.ListStacksRequest(), timeout=10)
    assert list(listed.stacks) == list(info.stacks)


def test_its_codes_equal_the_full_servers(activation_only: Running, server_loop: ServerLoop, onnx_stack: Path,
                                          tiny_gemma) -> None:
    full = start_server(server_loop, server_config(onnx_stack, self_check=False))
    try:
        full_info = full.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        requests = encode_requests(captured(tiny_gemma), top_k=12)
        expected = list(full.stub.EncodeActivations(iter(requests), timeout=60))
    finally:
        full.stop()
    got = list(activation_only.stub.EncodeActivations(iter(requests), timeout=60))
    info = activation_only.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    assert list(info.stacks) == list(full_info.stacks)  # one stack, described alike by both modes
    assert [r.sequence for r in got] == [r.sequence for r in expected] == [100, 101, 102, 103]
    for ours, theirs in zip(got, expected, strict=True):
        for a, b in zip(ours.rows, theirs.rows, strict=True):
            assert (a.stage, a.l0, list(a.ids)) == (b.stage, b.l0, list(b.ids))
            assert list(a.values) == pytest.approx(list(b.values), rel=1e-4, abs=1e-5)
            assert a.error_norm == pytest.approx(b.error_norm, rel=1e-4)


@pytest.mark.parametrize("rpc,request_", [
    ("GetFeature", pb.GetFeatureRequest(stage=SIGNED)), ("Tokenize", pb.TokenizeRequest(text="x")),
    ("Score", pb.ScoreRequest()), ("Decompose", pb.DecomposeRequest()), ("Generate", pb.GenerateRequest()),
    ("SearchFeatures", pb.SearchFeaturesRequest(explanation="cat")), ("ListFeatures", pb.ListFeaturesRequest())])
def test_rpcs_that_need_the_model_are_unimplemented_with_a_reason(activation_only: Running, rpc: str,
                                                                  request_) -> None:
    with pytest.raises(grpc.RpcError) as error:
        result = getattr(activation_only.stub, rpc)(request_, timeout=10)
        if rpc in ("Decompose", "Generate"):
            list(result)
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert error.value.details().startswith(f"{rpc} needs the host model") and "--no-model" in error.value.details()


def test_health_metrics_and_validation_work_as_in_the_full_server(activation_only: Running, tiny_gemma) -> None:
    assert activation_only.health() == "SERVING"
    with pytest.raises(grpc.RpcError) as error:
        list(activation_only.stub.EncodeActivations(iter([pb.EncodeActivationsRequest(stage=RESID)]), timeout=10))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "activations is required" in error.value.details()
    list(activation_only.stub.EncodeActivations(iter(encode_requests(captured(tiny_gemma))), timeout=60))
    text = activation_only.server.metrics.exposition().decode()
    assert f'featurewire_stage_l0_count{{stack="resae",stage="{RESID}"}}' in text
    assert 'featurewire_rpcs_total{code="INVALID_ARGUMENT",method="EncodeActivations",transport="grpc"}' in text
    assert 'featurewire_build_info{device="cpu",dtype="float32",model=""' in text


def test_auth_is_required_when_configured(server_loop: ServerLoop, onnx_stack: Path) -> None:
    running = start_activation_server(server_loop, server_config(onnx_stack, auth_token=TOKEN))
    try:
        with pytest.raises(grpc.RpcError) as error:
            running.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        info = running.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10,
                                          metadata=[("authorization", f"Bearer {TOKEN}")])
        assert info.capabilities.auth_required and running.health() == "SERVING"
    finally:
        running.stop()


def test_stacks_without_graphs_are_refused_or_answer_failed_precondition(server_loop: ServerLoop, tmp_path: Path,
                                                                         tiny_gemma) -> None:
    bare = write_resae_stack(tmp_path / "bare", tiny_gemma, onnx=False)

    async def build() -> ActivationServer:
        return ActivationServer(server_config(bare), device="cpu")

    with pytest.raises(FailedPrecondition, match="has no ONNX graphs; run `featurewire-train export-onnx"):
        server_loop.run(server_loop.run(build()).start())
    export_stack(bare, stages=[SIGNED], random_rows=16)  # the residual stage stays without a graph
    running = start_activation_server(server_loop, server_config(bare))
    try:
        requests = encode_requests(captured(tiny_gemma))
        assert len(list(running.stub.EncodeActivations(iter(requests[:1]), timeout=30))) == 1
        with pytest.raises(grpc.RpcError) as error:
            list(running.stub.EncodeActivations(iter(requests[1:2]), timeout=30))
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"stage '{RESID}' of stack 'resae' has no ONNX graph" in error.value.details()
    finally:
        running.stop()


def test_cli_refuses_no_model_with_a_model_or_without_stacks(capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_main(["serve", "--no-model", "--model", "tiny-random", "--stack", "x", "--port", "0"]) == 2
    assert "leave out --model" in capsys.readouterr().err
    assert serve_main(["serve", "--no-model", "--port", "0"]) == 2
    assert "needs at least one --stack" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_cli_server_runs_without_torch(onnx_stack: Path, tmp_path: Path, tiny_gemma) -> None:
    """A real `featurewire-serve serve --no-model` process: it serves, and libtorch is never mapped into it."""
    stack = shutil.copytree(onnx_stack, tmp_path / "stack")
    port = _free_port()
    command = [sys.executable, "-m", "service", "serve", "--no-model", "--stack", str(stack), "--host", "127.0.0.1",
               "--port", str(port), "--metrics-port", "0", "--device", "cpu"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 60
            while True:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:  # SERVING
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "the activation-only server did not become ready"
                time.sleep(0.2)
            stub = pb_grpc.FeaturewireStub(channel)
            responses = list(stub.EncodeActivations(iter(encode_requests(captured(tiny_gemma))), timeout=30))
            info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        assert len(responses) == 4 and not info.versions.torch and not info.versions.transformers
        maps = Path(f"/proc/{process.pid}/maps")
        if maps.exists():
            assert "libtorch" not in maps.read_text()
    finally:
        process.terminate()
        assert process.wait(30) == 0


def test_importing_the_activation_only_path_loads_neither_torch_nor_transformers() -> None:
    code = ("import json, sys; import service.cli, service.activation_server; "
            "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_the_encode_worker_bounds_its_queue_and_keeps_deadlines() -> None:
    async def scenario() -> None:
        worker = EncodeWorker(capacity=1)
        gate = threading.Event()
        running = asyncio.ensure_future(worker.run(lambda: gate.wait(10), deadline=None, method="t"))
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceeded, match="t: the deadline passed"):  # queued behind `running`
            await worker.run(lambda: 1, deadline=time.monotonic() + 0.05, method="t")
        waiting = asyncio.ensure_future(worker.run(lambda: 2, deadline=None, method="t"))
        await asyncio.sleep(0.05)
        assert worker.queue_depth == 1
        with pytest.raises(Overloaded, match="encode queue is full"):
            await worker.run(lambda: 3, deadline=None, method="t")
        gate.set()
        assert await running is True and await waiting == 2
        worker.shutdown()

    asyncio.run(scenario())


@pytest.mark.gpu
def test_graphs_run_on_the_cuda_provider_when_a_gpu_is_present(onnx_stack: Path, tiny_gemma) -> None:
    cpu, cuda = load_onnx_stack(onnx_stack), load_onnx_stack(onnx_stack, providers=providers_for("cuda"))
    assert cuda.provider == CUDA
    h = captured(tiny_gemma)["blocks.1.hook_resid_post"]
    spec = EncodeSpec(0, "resae", 0, h, None, 16, True)
    for a, b in zip(cpu.encode(spec), cuda.encode(spec), strict=True):
        assert a.l0 == b.l0 and a.ids == b.ids
        assert list(a.values) == pytest.approx(list(b.values), rel=1e-3, abs=1e-4)

