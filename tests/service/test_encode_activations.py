"""EncodeActivations in the full mode (torch stack runtime on the engine): one response per request, in
order, with the sequence echoed; the codes of the runtime; raw dtypes; every malformed batch answered
with its status and a message naming the field; a bad batch ends the stream after the good ones."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import types_pb2 as t

from core.errors import FailedPrecondition, InvalidRequest, NotFound
from core.sae.base import top_k_by_magnitude as torch_top_k
from core.stack.reader import read_stack
from core.stack.runtime import StackRuntime
from service.config import ServerConfig
from service.engine.contract.encode_spec import EncodeTarget, EncodeValidator, MatrixIn, top_k_by_magnitude
from tests.service.conftest import Running, ServerLoop, server_config, start_server
from tests.service.onnx_stacks import HOOKPOINTS, RESID, SIGNED, captured, encode_requests, matrix, write_resae_stack

MAX_ROWS, MAX_TOP_K = 40, 16


@pytest.fixture(scope="module")
def resae_stack(tmp_path_factory: pytest.TempPathFactory, tiny_gemma) -> Path:
    return write_resae_stack(tmp_path_factory.mktemp("encode") / "stack", tiny_gemma)


@pytest.fixture(scope="module")
def full(server_loop: ServerLoop, resae_stack: Path) -> Iterator[Running]:
    running = start_server(server_loop, server_config(resae_stack, self_check=False, max_batch_vectors=MAX_ROWS,
                                                      max_top_k=MAX_TOP_K))
    yield running
    running.stop()


def encode(running: Running, requests: list[pb.EncodeActivationsRequest]) -> list[pb.EncodeActivationsResponse]:
    return list(running.stub.EncodeActivations(iter(requests), timeout=60))


def test_full_mode_lists_encode_activations_with_the_torch_backend(full: Running) -> None:
    caps = full.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).capabilities
    assert caps.mode == pb.SERVING_MODE_FULL and caps.encode_backend == "torch"
    assert list(caps.rpcs)[-1] == "EncodeActivations" and "Decompose" in caps.rpcs


def test_responses_come_in_order_and_equal_the_stack_runtime(full: Running, resae_stack: Path, tiny_gemma) -> None:
    acts = captured(tiny_gemma)
    requests = encode_requests(acts)
    responses = encode(full, requests)
    assert [r.sequence for r in responses] == [r.sequence for r in requests] == [100, 101, 102, 103]
    runtime = StackRuntime.from_loaded(read_stack(resae_stack))
    h1, h2 = (torch.from_numpy(acts[hp]) for hp in HOOKPOINTS)
    results = {0: runtime.run_stage(runtime.stages[0], h1), 1: runtime.run_stage(runtime.stages[1], h2, h1)}
    half = h1.shape[0] // 2
    for response, (stage, part) in zip(responses, [(0, slice(0, half)), (1, slice(0, half)), (0, slice(half, None)),
                                                   (1, slice(half, None))], strict=True):
        result = results[stage]
        codes, errors = result.codes[part], result.error_norm()[part]
        values, ids = torch_top_k(codes, 8)
        assert len(response.rows) == codes.shape[0]
        for row, got in enumerate(response.rows):
            keep = values[row] != 0
            assert got.stage == stage and got.l0 == int((codes[row] != 0).sum())
            assert list(got.ids) == ids[row][keep].tolist()
            assert list(got.values) == pytest.approx(values[row][keep].tolist(), rel=1e-5, abs=1e-6)
            assert got.error_norm == pytest.approx(float(errors[row]), rel=1e-5)
            assert not got.HasField("predicted_error_norm")  # no stage has a predictor yet
    assert any(v < 0 for r in responses[0].rows for v in r.values)  # SA-GSAE codes are signed


@pytest.mark.parametrize("dtype", ["FLOAT32", "FLOAT16", "BFLOAT16"])
def test_raw_dtypes_equal_the_same_values_sent_as_floats(full: Running, tiny_gemma, dtype: str) -> None:
    acts = captured(tiny_gemma)
    rounded = {hp: x.astype("<f2").astype(np.float32) if dtype == "FLOAT16" else
               (x.view("<u4") & 0xFFFF0000).view(np.float32) if dtype == "BFLOAT16" else x for hp, x in acts.items()}
    raw = encode(full, encode_requests(acts, dtype=dtype, include_error=False))
    floats = encode(full, encode_requests(rounded, include_error=False))
    assert [r.rows for r in raw] == [r.rows for r in floats]
    assert not raw[0].rows[0].HasField("error_norm")


def _bad(stage: str = SIGNED, rows: int = 3, cols: int = 64, **fields) -> pb.EncodeActivationsRequest:
    x = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    request = pb.EncodeActivationsRequest(stage=stage, activations=matrix(x), **fields)
    return request


def _with(request: pb.EncodeActivationsRequest, **matrix_fields) -> pb.EncodeActivationsRequest:
    for key, value in matrix_fields.items():
        setattr(request.activations, key, value)
    return request


INVALID = grpc.StatusCode.INVALID_ARGUMENT
CASES = {  # id -> (request, status code, message fragment)
    "wrong vector length": (_bad(cols=63), INVALID, "activations.cols 63 is the wrong vector length"),
    "values not rows x cols": (_with(_bad(), rows=4), INVALID, "activations.values has 192 elements"),
    "raw without dtype": (pb.EncodeActivationsRequest(stage=SIGNED, activations=t.Matrix(rows=1, cols=64,
                                                                                         raw=b"\0" * 256)),
                          INVALID, "activations.dtype is required with raw"),
    "raw of the wrong dtype": (pb.EncodeActivationsRequest(stage=SIGNED, activations=t.Matrix(
        rows=1, cols=64, raw=b"\0" * 256, dtype=t.DTYPE_FLOAT16)), INVALID, "activations.raw has 256 bytes"),
    "unknown dtype": (pb.EncodeActivationsRequest(stage=SIGNED, activations=t.Matrix(rows=1, cols=64, raw=b"\0" * 256,
                                                                                     dtype=7)),
                      INVALID, "activations.dtype has unknown value 7"),
    "values and raw": (_with(_bad(rows=1), raw=b"\0" * 256, dtype=t.DTYPE_FLOAT32), INVALID, "not both"),
    "NaN": (pb.EncodeActivationsRequest(stage=SIGNED, activations=matrix(np.array([[0.0] * 63 + [np.nan]],
                                                                                  np.float32))),
            INVALID, "non-finite value (nan) at row 0, column 63"),
    "inf": (pb.EncodeActivationsRequest(stage=SIGNED, activations=matrix(np.full((2, 64), np.inf, np.float32))),
            INVALID, "non-finite value (inf) at row 0"),
    "empty batch": (pb.EncodeActivationsRequest(stage=SIGNED, activations=t.Matrix(rows=0, cols=64)), INVALID,
                    "empty batch"),
    "no activations": (pb.EncodeActivationsRequest(stage=SIGNED), INVALID, "activations is required"),
    "too many rows": (_bad(rows=MAX_ROWS + 1), INVALID, f"exceeds Limits.max_batch_vectors ({MAX_ROWS})"),
    "top_k too large": (_bad(top_k=MAX_TOP_K + 1), INVALID, f"top_k {MAX_TOP_K + 1} is out of range"),
    "previous missing": (_bad(stage=RESID), INVALID, "previous is required"),
    "previous for a plain stage": (_bad(previous=matrix(np.zeros((3, 64), np.float32))), INVALID,
                                   "previous is only for residualized stages"),
    "previous rows differ": (_bad(stage=RESID, previous=matrix(np.zeros((2, 64), np.float32))), INVALID,
                             "previous.rows 2 must equal activations.rows 3"),
    "no stage": (_bad(stage=""), INVALID, "stage is required"),
    "unknown stage": (_bad(stage="nope"), grpc.StatusCode.NOT_FOUND, "stage 'nope' is not a stage of stack 'resae'"),
    "unknown stack": (_bad(stack="nope"), grpc.StatusCode.NOT_FOUND, "stack 'nope' is not loaded"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_batches_get_their_status_and_a_clear_message(full: Running, case: str) -> None:
    request, code, fragment = CASES[case]
    with pytest.raises(grpc.RpcError) as error:
        encode(full, [request])
    assert error.value.code() == code and fragment in error.value.details(), error.value.details()


def test_a_bad_batch_ends_the_stream_after_the_good_ones_are_answered(full: Running, tiny_gemma) -> None:
    good = encode_requests(captured(tiny_gemma))[:2]
    call = full.stub.EncodeActivations(iter([*good, _bad(cols=10), good[0]]), timeout=60)
    received = []
    with pytest.raises(grpc.RpcError) as error:
        for response in call:
            received.append(response.sequence)
    assert received == [100, 101] and error.value.code() == INVALID


def test_the_validator_without_a_server() -> None:
    targets = {"s": [EncodeTarget(0, "a", 4, 10), EncodeTarget(1, "b", 4, 3, residual_of=0)]}
    validator = EncodeValidator(targets, ServerConfig(max_top_k=8, max_batch_vectors=5).limits())
    ones = MatrixIn(2, 4, values=[1.0] * 8)
    spec = validator.encode(9, "", "b", ones, ones, 0, True)
    assert (spec.sequence, spec.stack, spec.stage, spec.top_k, spec.rows) == (9, "s", 1, 3, 2)  # top_k <= d_sae
    assert spec.activations.dtype == np.float32 and spec.activations.flags.c_contiguous
    bf16 = np.array([1.5, -2.0, 3.25, 0.0], np.float32).view("<u4") >> 16
    decoded = validator.matrix(MatrixIn(1, 4, raw=bf16.astype("<u2").tobytes(), dtype="BFLOAT16"), "m", cols=4,
                               what="x")
    assert decoded.tolist() == [[1.5, -2.0, 3.25, 0.0]]
    with pytest.raises(FailedPrecondition, match="none loaded"):
        EncodeValidator({}, ServerConfig().limits()).encode(0, "", "a", ones, None, 0, False)
    with pytest.raises(NotFound):
        validator.encode(0, "", "c", ones, None, 0, False)
    with pytest.raises(InvalidRequest, match="6 exceeds"):
        validator.encode(0, "", "a", MatrixIn(6, 4, values=[0.0] * 24), None, 0, False)


def test_numpy_top_k_matches_the_torch_ranking() -> None:
    z = np.random.default_rng(1).standard_normal((6, 20)).astype(np.float32)
    values, ids = top_k_by_magnitude(z, 5)
    ref_values, ref_ids = torch_top_k(torch.from_numpy(z), 5)
    np.testing.assert_array_equal(ids, ref_ids.numpy())
    np.testing.assert_array_equal(values, ref_values.numpy())
