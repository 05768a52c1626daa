"""Stacks served through ONNX Runtime: the stage graphs `featurewire-train export-onnx` wrote, one session each.

No torch here (the activation-only server's memory is the point): the stack is verified with the
torch-free manifest reader (every listed file's size and sha256, the ONNX records and the weights they
were exported from), each graph is read once, re-hashed and handed to ONNX Runtime as bytes (what runs
is what was verified; a graph that refers to external data cannot load from bytes), and its inputs
and outputs are checked against the record before it serves. The graph interface is described in
trainer/interop/onnx_export.py.

Provider: CUDAExecutionProvider when a GPU is present (detected through the CUDA driver, or torch when
the process already imported it), else CPU. onnxruntime-gpu lists the CUDA provider even on machines
without a GPU, and asking for it there logs noisy errors, hence the check first.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from core.errors import FailedPrecondition
from core.stack.manifest import StackError, StackSummary, StageSummary, read_summary
from service.engine.contract.encode_spec import EncodeSpec, EncodeTarget, codes_rows, top_k_by_magnitude
from service.engine.contract.specs import StageCodes

log = logging.getLogger(__name__)
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def cuda_device_count() -> int:
    """GPUs the CUDA driver sees (0 without a driver); torch's answer when torch is already imported."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def providers_for(device: str) -> list[Any]:
    """ONNX Runtime providers for `auto`, `cpu`, `cuda` or `cuda:N` (FailedPrecondition when CUDA is asked for
    and absent)."""
    device = device.strip().lower()
    if device == "cpu":
        return [CPU]
    index = int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0
    if device not in ("auto", "cuda") and not device.startswith("cuda:"):
        raise FailedPrecondition(f"device {device!r} is not one of auto, cpu, cuda, cuda:N")
    usable = CUDA in ort.get_available_providers() and cuda_device_count() > index
    if usable:
        return [(CUDA, {"device_id": index}), CPU]
    if device != "auto":
        raise FailedPrecondition(f"device {device!r} was asked for, but ONNX Runtime has no usable CUDA device here")
    return [CPU]


@dataclass(eq=False)
class OnnxStage:
    """One stage's session and what its graph computes."""

    summary: StageSummary
    session: ort.InferenceSession
    codes: str  # "top_k" or "full"
    has_predictor: bool

    def run(self, spec: EncodeSpec) -> list[StageCodes]:
        """The batch's codes, top-k by |value|, with error norms when asked for."""
        # Without error norms, one row's decode (see trainer/interop/onnx_export.py: not an empty error_rows).
        rows = np.arange(spec.rows if spec.include_error else 1, dtype=np.int64)
        feeds = {"activations": spec.activations, "error_rows": rows}
        if spec.previous is not None:
            feeds["previous"] = spec.previous
        predicted = ["predicted_error_norm"] if self.has_predictor and spec.include_error else []
        if self.codes == "top_k":
            feeds["top_k"] = np.array([spec.top_k], dtype=np.int64)
            values, indices, l0, error, *extra = self.session.run(["values", "indices", "l0", "error_norm",
                                                                   *predicted], feeds)
        else:
            z, l0, error, *extra = self.session.run(["codes", "l0", "error_norm", *predicted], feeds)
            values, indices = top_k_by_magnitude(z, spec.top_k)
        return codes_rows(spec.stage, values, indices, l0, error if spec.include_error else None,
                          extra[0] if extra else None)


def _expected_io(summary: StageSummary, d_prev: int | None) -> tuple[dict[str, int | None], set[str]]:
    """Input name -> width (None for 1-D inputs), and the output names the record must contain."""
    inputs: dict[str, int | None] = {"activations": summary.d_in, "error_rows": None}
    if d_prev is not None:
        inputs["previous"] = d_prev
    record = summary.onnx or {}
    if record.get("codes") == "top_k":
        inputs["top_k"] = None
        outputs = {"values", "indices", "l0", "error_norm"}
    else:
        outputs = {"codes", "l0", "error_norm"}
    return inputs, outputs


def _session(root: Path, summary: StageSummary, d_prev: int | None, providers: Sequence[Any],
             threads: int) -> OnnxStage:
    record = summary.onnx or {}
    data = (root / record["file"]).read_bytes()
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise StackError(f"stack file {record['file']!r} changed while the stack was being read")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    # Idle ONNX Runtime threads spin-wait by default; between batches that steals the cores the event loop
    # needs for gRPC and protobuf work (and a pod's CPU quota), for a latency gain of microseconds per batch.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(data, sess_options=options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own error types (invalid graph, unsupported opset, ...)
        raise StackError(f"stage {summary.name!r}: ONNX Runtime cannot load {record['file']!r}: {exc!s:.300}") from None
    inputs, outputs = _expected_io(summary, d_prev)
    got = {i.name: i.shape for i in session.get_inputs()}
    names = {o.name for o in session.get_outputs()}
    widths_ok = all(name in got and (width is None or got[name][-1] == width) for name, width in inputs.items())
    if set(got) != set(inputs) or not widths_ok or not outputs <= names or names - outputs - {"predicted_error_norm"}:
        raise StackError(f"stage {summary.name!r}: graph {record['file']!r} has inputs {got} and outputs "
                         f"{sorted(names)}; expected inputs {inputs} and outputs {sorted(outputs)}")
    return OnnxStage(summary, session, str(record["codes"]), "predicted_error_norm" in names)


@dataclass(eq=False)
class OnnxStack:
    """A verified stack and a session for each stage that has a graph."""

    summary: StackSummary
    stages: dict[int, OnnxStage]
    provider: str  # what actually runs the sessions, e.g. "CPUExecutionProvider"
    targets: list[EncodeTarget] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.summary.name

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.summary.stages]

    def has_error_predictor(self, index: int) -> bool:
        return index in self.stages and self.stages[index].has_predictor

    def encode(self, spec: EncodeSpec) -> list[StageCodes]:
        stage = self.stages.get(spec.stage)
        if stage is None:
            name = self.summary.stages[spec.stage].name
            raise FailedPrecondition(f"stage {name!r} of stack {self.name!r} has no ONNX graph; run "
                                     f"`featurewire-train export-onnx --stack DIR --stage {name}`")
        return stage.run(spec)

    def warm_up(self) -> None:
        """One row of zeros through every session (allocations, CUDA kernels), with error norms."""
        for index, stage in self.stages.items():
            s = stage.summary
            prev = None
            if s.residual_of is not None:
                prev = np.zeros((1, self.summary.stages[s.residual_of].d_in), np.float32)
            stage.run(EncodeSpec(0, self.name, index, np.zeros((1, s.d_in), np.float32), prev, 1, True))


def load_onnx_stack(path: str | Path, *, providers: Sequence[Any] = (CPU,), threads: int = 0) -> OnnxStack:
    """Verify the stack at `path` and open a session per stage graph; FailedPrecondition says what is wrong
    (a broken stack, or one without any graph: export it first)."""
    try:
        summary = read_summary(path)
        if not any(s.onnx for s in summary.stages):
            raise StackError(f"stack {summary.name!r} has no ONNX graphs; run `featurewire-train export-onnx --stack "
                             f"{path}` first")
        stages = {}
        for s in summary.stages:
            if s.onnx is not None:
                d_prev = summary.stages[s.residual_of].d_in if s.residual_of is not None else None
                stages[s.index] = _session(summary.path, s, d_prev, providers, threads)
    except StackError as exc:
        raise FailedPrecondition(f"cannot serve the stack at {str(path)!r} without a model: {exc}") from None
    missing = [s.name for s in summary.stages if s.index not in stages]
    if missing:
        log.warning("stack %s: stages without an ONNX graph answer FAILED_PRECONDITION: %s", summary.name,
                    ", ".join(missing))
    used = next(iter(stages.values())).session.get_providers()[0]
    targets = [EncodeTarget(s.index, s.name, s.d_in, s.d_sae, s.residual_of) for s in summary.stages]
    return OnnxStack(summary, stages, used, targets)
