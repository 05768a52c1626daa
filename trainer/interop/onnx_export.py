"""ONNX export of a stack: one self-contained graph per stage, parity-checked, listed in the manifest.

Why ONNX: applications that run their model elsewhere (vLLM, TGI, a custom runtime) send captured
activations to `featurewire-serve serve --no-model`, which encodes them with ONNX Runtime and never loads
torch or a host model (docs/api.md, EncodeActivations).

Each graph is traced from `StageGraph` (trainer/interop/stage_graph.py), whose forward is the stack runtime's
own math (core.stack.runtime: input scale or ReSAE residual, the SAE's `encode`, `decode`, back to activation
space), so the graph and the service's torch path cannot drift apart; the parity check
(trainer/interop/onnx_parity.py) fails the export when ONNX Runtime disagrees with torch. Graph interface
(N rows, M error rows, K features):

    inputs   activations (N, d_in) float32     raw activations at the stage's hookpoint
             previous    (N, d_prev) float32   ReSAE stages only: activations at the source stage's hookpoint
             error_rows  (M,) int64            rows whose error norms to compute, M >= 1
             top_k       (1,) int64            codes "top_k" only: K, 1 <= K <= d_sae
    outputs  values (N, K) float32, indices (N, K) int64   codes "top_k": the K largest |z|, signed, descending
             codes (N, d_sae) float32                      codes "full": every code
             l0 (N,) int64                                 non-zero codes per row
             error_norm (M,) float32                       ‖h − ĥ‖ in activation units, for error_rows
             predicted_error_norm (M,) float32             only when the stage has an error predictor

`error_rows` exists because ONNX Runtime runs every node of a graph whatever outputs are asked for: a
request that wants no error norms passes `[0]` and ignores the one norm, so the decode costs one row
instead of N (not an empty list: ONNX Runtime's reductions return a wrongly shaped result on empty input).
The top-k tail (Abs → TopK → GatherElements) is appended to the traced graph so that K is an input.
Opset 17 and IR version 8 (what torch's TorchScript exporter writes): onnxruntime ≥ 1.14 loads them.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import onnx
import torch
from onnx import TensorProto, helper
from torch import Tensor

from core import __version__
from core.stack.manifest import StackError, attach_onnx
from core.stack.reader import read_stack
from core.stack.runtime import StackRuntime
from trainer.interop.onnx_parity import ParityReport, check_parity, random_inputs
from trainer.interop.stage_graph import ErrorPredictor, StageGraph, error_predictor, input_names

OPSET = 17
IR_VERSION = 8
MAX_GRAPH_BYTES = 2**31 - 1  # protobuf's limit: larger stages would need ONNX external data (not supported)
Codes = Literal["top_k", "full"]
def _trace(graph: StageGraph) -> onnx.ModelProto:
    """torch.onnx.export (TorchScript tracing) of `graph` with dynamic row counts."""
    stage = graph.stage
    example: list[Tensor] = [torch.zeros(2, stage.sae.d_in)]
    if stage.is_residual:
        example.append(torch.zeros(2, graph.runtime.stages[stage.residual_of].sae.d_in))
    example.append(torch.arange(2))
    names = input_names(graph)
    outputs = ["codes", "l0", "error_norm", *(["predicted_error_norm"] if graph.predictor is not None else [])]
    axes = {n: {0: "batch"} for n in (*names[:-1], "codes", "l0")}
    axes |= {n: {0: "error_rows"} for n in ("error_rows", "error_norm", "predicted_error_norm") if n in names + outputs}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs onnxscript; tracer
        # warnings flag Python values baked into the trace (TopK's k = min(k, d_sae) is one, and constant).
        # A trace that went wrong shows up in the parity check, which runs on every export.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(graph.eval(), tuple(example), buffer, dynamo=False, opset_version=OPSET,
                          input_names=names, output_names=outputs, dynamic_axes=axes, do_constant_folding=True)
    return onnx.load_from_string(buffer.getvalue())


def _append_top_k(model: onnx.ModelProto) -> None:
    """Replace the dense `codes` output by the K largest |codes| (values signed, indices), K an input."""
    graph = model.graph
    codes = next(o for o in graph.output if o.name == "codes")
    graph.output.remove(codes)
    graph.input.append(helper.make_tensor_value_info("top_k", TensorProto.INT64, [1]))
    graph.node.extend([
        helper.make_node("Abs", ["codes"], ["codes_abs"], name="featurewire_abs"),
        helper.make_node("TopK", ["codes_abs", "top_k"], ["top_abs", "indices"], name="featurewire_top_k", axis=-1,
                         largest=1, sorted=1),
        helper.make_node("GatherElements", ["codes", "indices"], ["values"], name="featurewire_gather", axis=1),
    ])
    graph.output.insert(0, helper.make_tensor_value_info("indices", TensorProto.INT64, ["batch", "k"]))
    graph.output.insert(0, helper.make_tensor_value_info("values", TensorProto.FLOAT, ["batch", "k"]))


def build_graph(runtime: StackRuntime, index: int, *, codes: Codes = "top_k",
                predictor: ErrorPredictor | None = None, metadata: Mapping[str, str] | None = None) -> bytes:
    """The serialized ONNX model of stage `index` (checked by onnx.checker)."""
    if codes not in ("top_k", "full"):
        raise ValueError(f"codes must be 'top_k' or 'full', got {codes!r}")
    graph = StageGraph(runtime, index, predictor)
    model = _trace(graph)
    if codes == "top_k":
        _append_top_k(model)
    model.ir_version = IR_VERSION
    model.producer_name, model.producer_version = "featurewire-trainer", __version__
    stage = graph.stage
    helper.set_model_props(model, {
        "featurewire.stage": stage.name, "featurewire.index": str(stage.index),
        "featurewire.hookpoint": stage.hookpoint, "featurewire.architecture": stage.sae.cfg.architecture,
        "featurewire.codes": codes,
        "featurewire.residual_of": "" if stage.residual_of is None else str(stage.residual_of), **(metadata or {})})
    data = model.SerializeToString()
    if len(data) > MAX_GRAPH_BYTES:
        raise StackError(f"stage {stage.name!r}: its graph would be {len(data) >> 20} MiB, beyond protobuf's 2 GiB")
    onnx.checker.check_model(model, full_check=True)
    return data


@dataclass(frozen=True)
class StageExport:
    """One exported stage: its graph and the manifest record fields."""

    index: int
    name: str
    data: bytes
    record: dict[str, Any]
    parity: list[ParityReport]


def export_stage(runtime: StackRuntime, index: int, *, codes: Codes = "top_k", predictor: ErrorPredictor | None = None,
                 real: Mapping[str, Tensor] | None = None, random_rows: int = 512, seed: int = 0,
                 stack_name: str = "") -> StageExport:
    """Build stage `index`'s graph and check it against torch on random (and `real`) activations; raises
    StackError naming the stage and the largest difference when parity fails."""
    stage = runtime.stages[index]
    data = build_graph(runtime, index, codes=codes, predictor=predictor, metadata={"featurewire.stack": stack_name})
    graph = StageGraph(runtime, index, predictor).eval()
    checks = [("random", random_inputs(runtime, index, random_rows, seed))]
    if real is not None:
        source = runtime.stages[stage.residual_of].hookpoint if stage.is_residual else None
        checks.append(("real", (real[stage.hookpoint], real[source] if source else None)))
    reports = [check_parity(data, graph, h, prev, codes=codes, source=kind) for kind, (h, prev) in checks]
    for report in reports:
        if not report.passed:
            raise StackError(f"stage {stage.name!r}: ONNX Runtime disagrees with torch on {report.source} "
                             f"activations: {report.describe()}")
    names = input_names(graph) + (["top_k"] if codes == "top_k" else [])
    outputs = (["values", "indices"] if codes == "top_k" else ["codes"]) + ["l0", "error_norm"]
    record = {"codes": codes, "opset": OPSET, "ir_version": IR_VERSION, "inputs": names,
              "outputs": outputs + (["predicted_error_norm"] if predictor is not None else []),
              "parity": {r.source: r.to_dict() for r in reports}}
    return StageExport(index, stage.name, data, record, reports)


def export_stack(stack_dir: str | Path, *, codes: Codes = "top_k", stages: Sequence[str] = (),
                 real: Mapping[str, Tensor] | Callable[[], Mapping[str, Tensor]] | None = None,
                 random_rows: int = 512, seed: int = 0,
                 predictors: Mapping[int, ErrorPredictor] | None = None) -> list[StageExport]:
    """Export every stage (or the named ones) of the stack at `stack_dir` and list the graphs in its manifest.

    `real` maps hookpoint -> (N, d) activations that flowed there (or a function returning that, called
    once); the parity check then runs on them as well as on random activations. Nothing is written unless
    every stage passes.
    """
    stack = read_stack(stack_dir)
    runtime = StackRuntime.from_loaded(stack)
    names = [s.name for s in stack.stages]
    unknown = [n for n in stages if n not in names]
    if unknown:
        raise StackError(f"no stage named {', '.join(map(repr, unknown))} in stack {stack.name!r}; stages: {names}")
    chosen = [i for i, n in enumerate(names) if not stages or n in stages]
    activations = real() if callable(real) else real
    exports = []
    for i in chosen:
        predictor = (predictors or {}).get(i) or error_predictor(stack.stages[i])
        exports.append(export_stage(runtime, i, codes=codes, predictor=predictor, real=activations,
                                    random_rows=random_rows, seed=seed + i, stack_name=stack.name))
    attach_onnx(stack_dir, {e.index: (e.data, e.record) for e in exports})
    return exports
