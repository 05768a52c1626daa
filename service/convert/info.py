"""What the server is and serves: GetServerInfo (model, hookpoints, stacks, capabilities, limits, versions)
and ListStacks.

Torch-free at import: the activation-only server describes its stacks from the torch-free manifest
summary, so what needs torch (hookpoint kinds, the model fingerprint) is imported only where a host model
is described.
"""

from __future__ import annotations

import functools
import math
import platform
import socket
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any

from featurewire.v1 import featurewire_pb2 as pb

import service
from core.stack.manifest import StackSummary
from service.config import ServerConfig
from service.convert.enums import ACTIONS, OPS, table

if TYPE_CHECKING:
    from core.host.host_model import HostModel
    from service.engine.stacks.onnx_runtime import OnnxStack
    from service.engine.stacks.served import ServedStack

SERVING_MODES = {"full": pb.SERVING_MODE_FULL, "activation_only": pb.SERVING_MODE_ACTIVATION_ONLY}
FULL_RPCS = ("GetServerInfo", "ListStacks", "GetFeature", "Tokenize", "Decompose", "Generate", "Score",
             "SearchFeatures", "ListFeatures")
ACTIVATION_ONLY_RPCS = ("GetServerInfo", "ListStacks")


def numeric_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a metrics record, nested records flattened to dotted keys (bools dropped)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            out.update(numeric_metrics(value, f"{prefix}{key}."))
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


def _stage_record(stage: Any, key: str) -> bool:
    """Whether a stage carries an optional record (density, top examples) in its extras or extra tensors, or a
    dashboard, which has both."""
    return stage.dashboard is not None or key in (stage.extras or {}) or key in (stage.extra_tensors or {})


def _summary_info(summary: StackSummary, has_error_predictor: Any) -> pb.StackInfo:
    """StackInfo from the torch-free manifest summary (the activation-only server)."""
    stages = []
    for s in summary.stages:
        info = pb.StageInfo(
            index=s.index, name=s.name, hookpoint=s.hookpoint, architecture=s.architecture, d_in=s.d_in,
            d_sae=s.d_sae, signed=s.signed, input_scale=s.input_scale, has_error_predictor=has_error_predictor(s.index),
            has_density="density" in s.records, has_top_examples="top_examples" in s.records,
            metrics=numeric_metrics(s.metrics))
        if s.residual_of is not None:
            info.residual_of = s.residual_of
        stages.append(info)
    return pb.StackInfo(name=summary.name, digest=summary.digest, path=summary.path.name,
                        host_model=summary.host_model, created_by=summary.created_by, stages=stages)


def stack_info(stack: ServedStack | OnnxStack) -> pb.StackInfo:
    summary = getattr(stack, "summary", None)
    if isinstance(summary, StackSummary):
        return _summary_info(summary, stack.has_error_predictor)
    loaded = stack.loaded
    stages = []
    for s in loaded.stages:
        info = pb.StageInfo(
            index=s.index, name=s.name, hookpoint=s.hookpoint, architecture=s.sae.cfg.architecture,
            d_in=s.sae.cfg.d_in, d_sae=s.sae.cfg.d_sae, signed=bool(s.signed), input_scale=s.input_scale,
            has_error_predictor=stack.has_error_predictor(s.index), has_density=_stage_record(s, "density"),
            has_top_examples=_stage_record(s, "top_examples"), metrics=numeric_metrics(s.metrics),
            has_dashboard=s.dashboard is not None, has_explanations=bool(loaded.explanations.get(s.name)),
            has_meta_sae=s.meta_sae is not None)
        if s.residual_of is not None:
            info.residual_of = s.residual_of
        stages.append(info)
    return pb.StackInfo(name=stack.name, digest=stack.digest, path=stack.path.name, host_model=loaded.identity.name,
                        created_by=loaded.created_by, stages=stages)


def list_stacks_response(stacks: Sequence[ServedStack | OnnxStack]) -> pb.ListStacksResponse:
    return pb.ListStacksResponse(stacks=[stack_info(s) for s in stacks])


@functools.cache
def _hook_kinds() -> dict[Any, int]:
    from core.host.hookpoints import HookKind  # torch: only where a host model is described

    return {m: n for n, m in table(pb.HookpointKind, "HOOKPOINT_KIND_", HookKind).items()}


def _model_info(host: HostModel) -> pb.ModelInfo:
    from core.stack.identity import model_fingerprint

    summary = host.summary()
    return pb.ModelInfo(name=summary.name, architecture=summary.model_type, num_layers=summary.num_layers,
                        d_model=summary.d_model, vocab_size=summary.vocab_size, dtype=summary.dtype,
                        device=summary.device, fingerprint=model_fingerprint(host.model))


def _limits(config: ServerConfig) -> pb.Limits:
    limits = config.limits()
    return pb.Limits(**{f.name: getattr(limits, f.name) for f in pb.Limits.DESCRIPTOR.fields})


def _loaded_version(module: str) -> str:
    """The version of a library this process has imported (empty when it is not in use)."""
    loaded = sys.modules.get(module)
    return str(getattr(loaded, "__version__", "")) if loaded is not None else ""


def versions() -> pb.Versions:
    try:
        grpc_version = metadata.version("grpcio")
    except metadata.PackageNotFoundError:
        grpc_version = _loaded_version("grpc")
    return pb.Versions(server=service.__version__, api="v1", torch=_loaded_version("torch"),
                       transformers=_loaded_version("transformers"), onnxruntime=_loaded_version("onnxruntime"),
                       grpc=grpc_version, python=platform.python_version())


def server_info(host: HostModel | None, stacks: Sequence[ServedStack | OnnxStack], config: ServerConfig, mode: str, *,
                encode_backend: str = "") -> pb.GetServerInfoResponse:
    """`mode` is "full" or "activation_only"; EncodeActivations is listed only when `encode_backend` names
    what serves it (until then it answers UNIMPLEMENTED)."""
    if mode not in SERVING_MODES:
        raise ValueError(f"unknown serving mode {mode!r}; expected one of {', '.join(SERVING_MODES)}")
    full = mode == "full"
    rpcs = (FULL_RPCS if full else ACTIVATION_ONLY_RPCS) + (("EncodeActivations",) if encode_backend else ())
    capabilities = pb.Capabilities(
        mode=SERVING_MODES[mode], rpcs=rpcs, intervention_ops=sorted(OPS) if full else [],
        condition_actions=sorted(ACTIONS) if full else [], steering_vectors=full, encode_backend=encode_backend,
        auth_required=config.auth_enabled)
    response = pb.GetServerInfoResponse(
        stacks=[stack_info(s) for s in stacks], capabilities=capabilities, limits=_limits(config),
        versions=versions(), instance=socket.gethostname())
    if host is not None:
        response.model.CopyFrom(_model_info(host))
        kinds = _hook_kinds()
        response.hookpoints.extend(pb.HookpointInfo(name=p.name, layer=p.layer, kind=kinds[p.kind], d=p.dim)
                                   for p in host.hookpoints)
    return response
