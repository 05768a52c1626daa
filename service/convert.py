"""Protobuf <-> engine specs and events: the servicer's only translation layer.

Requests: plain values are pulled out of the messages (presence kept where the proto declares it,
enums mapped by name to the spec enums, UNSPECIFIED -> None, an unknown enum number -> InvalidRequest
naming the field) and handed to `RequestValidator`, which checks them and builds the specs. Responses:
spec events become messages with features as packed parallel arrays (ids uint32, values float).

Torch-free at import: the activation-only server uses this module without torch or transformers, so
what needs them (hookpoint kinds, the model fingerprint) is imported where a host model is described.
"""

from __future__ import annotations

import functools
import math
import platform
import socket
import sys
from collections.abc import Iterable, Mapping, Sequence
from enum import Enum
from importlib import metadata
from typing import TYPE_CHECKING, Any, TypeVar

from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import types_pb2 as t

import service
from core.errors import InvalidRequest
from core.stack.manifest import StackSummary
from service.config import ServerConfig
from service.engine.encode_spec import RAW_DTYPES, EncodeSpec, MatrixIn
from service.engine.inputs import (
    ConditionIn,
    DecomposeOptionsIn,
    InputIn,
    InterventionIn,
    Limits,
    PositionsIn,
    SamplingIn,
    SteeringIn,
)
from service.engine.specs import (
    Action,
    Branch,
    Comparison,
    ConditionEvent,
    DecomposeChunk,
    DecomposeHeader,
    DecomposeSpec,
    FeatureInfo,
    FinishEvent,
    FinishReason,
    GenerateHeader,
    GenerateSpec,
    Op,
    Scope,
    ScoreResult,
    ScoreSpec,
    StageCodes,
    TokenEvent,
)

if TYPE_CHECKING:
    from core.host.host_model import HostModel
    from service.engine.encode_spec import EncodeValidator
    from service.engine.onnx_runtime import OnnxStack
    from service.engine.served import ServedStack
    from service.engine.validation import RequestValidator

E = TypeVar("E", bound=Enum)


def _table(wrapper: Any, prefix: str, enum: type[E]) -> dict[int, E]:
    """proto number -> spec member, matched by name (a renamed member fails at import, not mid-request)."""
    return {wrapper.Value(f"{prefix}{member.name}"): member for member in enum}


OPS = _table(t.InterventionOp, "INTERVENTION_OP_", Op)
SCOPES = _table(t.PositionScope, "POSITION_SCOPE_", Scope)
COMPARISONS = _table(t.Comparison, "COMPARISON_", Comparison)
ACTIONS = _table(t.ConditionAction, "CONDITION_ACTION_", Action)
BRANCHES = {m: n for n, m in _table(t.Branch, "BRANCH_", Branch).items()}
FINISH_REASONS = {m: n for n, m in _table(pb.FinishReason, "FINISH_REASON_", FinishReason).items()}
ACTION_NUMBERS = {m: n for n, m in ACTIONS.items()}
DTYPES = {t.DType.Value(f"DTYPE_{name}"): name for name in RAW_DTYPES}
SERVING_MODES = {"full": pb.SERVING_MODE_FULL, "activation_only": pb.SERVING_MODE_ACTIVATION_ONLY}
FULL_RPCS = ("GetServerInfo", "ListStacks", "GetFeature", "Tokenize", "Decompose", "Generate", "Score")
ACTIVATION_ONLY_RPCS = ("GetServerInfo", "ListStacks")


def _enum(number: int, table: Mapping[int, E], wrapper: Any, field: str) -> E | None:
    """UNSPECIFIED (0) -> None; an unknown number (a newer client, a hand-made message) -> InvalidRequest."""
    if number == 0:
        return None
    if number not in table:
        choices = ", ".join(wrapper.Name(n) for n in table)
        raise InvalidRequest(f"{field} has unknown value {number}; valid: {choices}")
    return table[number]


# ------------------------------------------------------------------------------------------- requests


def _input(msg: t.Input, present: bool) -> InputIn | None:
    if not present:
        return None
    source = msg.WhichOneof("source")
    special = msg.add_special_tokens if msg.HasField("add_special_tokens") else None
    return InputIn(text=msg.text if source == "text" else None,
                   token_ids=tuple(msg.token_ids.ids) if source == "token_ids" else None,
                   add_special_tokens=special)


def _positions(msg: t.Positions, present: bool, field: str) -> PositionsIn | None:
    if not present:
        return None
    return PositionsIn(_enum(msg.scope, SCOPES, t.PositionScope, f"{field}.scope"), msg.start, msg.end)


def _options(msg: t.DecomposeOptions) -> DecomposeOptionsIn:
    return DecomposeOptionsIn(stages=tuple(msg.stages), top_k=msg.top_k, include_error=msg.include_error,
                              feature_filter=tuple((f.stage, tuple(f.ids)) for f in msg.feature_filter))


def _interventions(items: Iterable[t.Intervention]) -> list[InterventionIn]:
    out = []
    for i, x in enumerate(items):
        field = f"interventions[{i}]"
        out.append(InterventionIn(
            stage=x.stage, feature=x.feature, op=_enum(x.op, OPS, t.InterventionOp, f"{field}.op"),
            value=x.value, lo=x.lo, hi=x.hi, condition_id=x.condition_id,
            positions=_positions(x.positions, x.HasField("positions"), f"{field}.positions"),
        ))
    return out


def _steering(items: Iterable[t.SteeringVector]) -> list[SteeringIn]:
    return [SteeringIn(hookpoint=x.hookpoint, values=x.values, scale=x.scale if x.HasField("scale") else None,
                       positions=_positions(x.positions, x.HasField("positions"), f"steering_vectors[{i}].positions"),
                       condition_id=x.condition_id)
            for i, x in enumerate(items)]


def _conditions(items: Iterable[t.Condition]) -> list[ConditionIn]:
    out = []
    for i, c in enumerate(items):
        field = f"conditions[{i}]"
        out.append(ConditionIn(
            id=c.id, stage=c.stage, feature=c.feature, threshold=c.threshold,
            comparison=_enum(c.comparison, COMPARISONS, t.Comparison, f"{field}.comparison"),
            action=_enum(c.action, ACTIONS, t.ConditionAction, f"{field}.action"),
            positions=_positions(c.positions, c.HasField("positions"), f"{field}.positions"),
        ))
    return out


def _sampling(msg: pb.SamplingParams) -> SamplingIn:
    return SamplingIn(max_new_tokens=msg.max_new_tokens, temperature=msg.temperature, top_p=msg.top_p,
                      top_k=msg.top_k, seed=msg.seed if msg.HasField("seed") else None, stop=tuple(msg.stop),
                      ignore_eos=msg.ignore_eos)


def decompose_spec(req: pb.DecomposeRequest, v: RequestValidator) -> DecomposeSpec:
    options = _options(req.options) if req.HasField("options") else None
    return v.decompose(req.stack, _input(req.input, req.HasField("input")), options, req.chunk_tokens)


def generate_spec(req: pb.GenerateRequest, v: RequestValidator) -> GenerateSpec:
    return v.generate(
        req.stack, _input(req.prompt, req.HasField("prompt")),
        _sampling(req.sampling) if req.HasField("sampling") else None,
        interventions=_interventions(req.interventions), steering=_steering(req.steering_vectors),
        conditions=_conditions(req.conditions),
        decompose=_options(req.decompose) if req.HasField("decompose") else None, with_default=req.with_default,
    )


def score_spec(req: pb.ScoreRequest, v: RequestValidator) -> ScoreSpec:
    return v.score(req.stack, _input(req.input, req.HasField("input")), _interventions(req.interventions),
                   _steering(req.steering_vectors), tuple(req.splice_stages))


def feature_request(req: pb.GetFeatureRequest, v: RequestValidator) -> tuple[ServedStack, int, int, int]:
    """(stack, stage index, feature id, top_n)."""
    return v.get_feature(req.stack, req.stage, req.feature, req.top_n)


def _matrix(msg: t.Matrix, present: bool, field: str) -> MatrixIn | None:
    if not present:
        return None
    if msg.dtype and msg.dtype not in DTYPES:
        valid = ", ".join(t.DType.Name(n) for n in DTYPES)
        raise InvalidRequest(f"{field}.dtype has unknown value {msg.dtype}; valid: {valid}")
    return MatrixIn(rows=msg.rows, cols=msg.cols, values=msg.values, raw=msg.raw, dtype=DTYPES.get(msg.dtype))


def encode_spec(req: pb.EncodeActivationsRequest, v: EncodeValidator) -> EncodeSpec:
    return v.encode(req.sequence, req.stack, req.stage, _matrix(req.activations, req.HasField("activations"),
                                                                "activations"),
                    _matrix(req.previous, req.HasField("previous"), "previous"), req.top_k, req.include_error)


def tokenize_request(req: pb.TokenizeRequest, v: RequestValidator) -> tuple[str, bool]:
    """(text, add_special_tokens)."""
    return v.tokenize(req.text, req.add_special_tokens if req.HasField("add_special_tokens") else None)


# ------------------------------------------------------------------------------------------ responses


def stage_codes(codes: StageCodes) -> t.StageCodes:
    msg = t.StageCodes(stage=codes.stage, ids=codes.ids, values=codes.values, l0=codes.l0)
    if codes.error_norm is not None:
        msg.error_norm = codes.error_norm
    if codes.predicted_error_norm is not None:
        msg.predicted_error_norm = codes.predicted_error_norm
    return msg


def _stage_refs(stack: ServedStack | None, indices: Sequence[int]) -> list[t.StageRef]:
    if stack is None:
        return []
    stages = stack.loaded.stages
    return [t.StageRef(index=i, name=stages[i].name, hookpoint=stages[i].hookpoint, d_sae=stages[i].sae.cfg.d_sae,
                       signed=bool(stages[i].signed)) for i in indices]


def decompose_response(event: DecomposeHeader | DecomposeChunk, stack: ServedStack) -> pb.DecomposeResponse:
    if isinstance(event, DecomposeHeader):
        return pb.DecomposeResponse(header=pb.DecomposeHeader(
            stack=event.stack, stack_digest=event.stack_digest, stages=_stage_refs(stack, event.stages),
            num_tokens=event.num_tokens, top_k=event.top_k))
    if isinstance(event, DecomposeChunk):
        return pb.DecomposeResponse(chunk=pb.DecomposeChunk(tokens=[
            pb.TokenFeatures(token=t.Token(position=tf.position, id=tf.token_id, text=tf.text),
                             features=[stage_codes(c) for c in tf.features])
            for tf in event.tokens]))
    raise TypeError(f"not a Decompose event: {type(event).__name__}")


def _condition_event(event: ConditionEvent, stack: ServedStack | None) -> pb.ConditionEvent:
    name = stack.loaded.stages[event.stage].name if stack is not None else str(event.stage)
    return pb.ConditionEvent(branch=BRANCHES[event.branch], condition_id=event.condition_id, stage=name,
                             feature=event.feature, position=event.position, value=event.value,
                             action=ACTION_NUMBERS[event.action])


def generate_response(event: GenerateHeader | TokenEvent | ConditionEvent | FinishEvent,
                      stack: ServedStack | None) -> pb.GenerateResponse:
    if isinstance(event, TokenEvent):
        return pb.GenerateResponse(token=pb.TokenEvent(
            branch=BRANCHES[event.branch], index=event.index, position=event.position, token_id=event.token_id,
            text=event.text, logprob=event.logprob, features=[stage_codes(c) for c in event.features]))
    if isinstance(event, ConditionEvent):
        return pb.GenerateResponse(condition=_condition_event(event, stack))
    if isinstance(event, FinishEvent):
        finish = pb.FinishEvent(branch=BRANCHES[event.branch], reason=FINISH_REASONS[event.reason],
                                stop_string=event.stop_string, prompt_tokens=event.prompt_tokens,
                                generated_tokens=event.generated_tokens, text=event.text)
        if event.trigger is not None:
            finish.trigger.CopyFrom(_condition_event(event.trigger, stack))
        return pb.GenerateResponse(finish=finish)
    if isinstance(event, GenerateHeader):
        return pb.GenerateResponse(header=pb.GenerateHeader(
            stack=event.stack, stack_digest=event.stack_digest, stages=_stage_refs(stack, event.stages),
            prompt=[t.Token(position=p, id=i, text=s) for p, (i, s) in enumerate(event.prompt)],
            prompt_tokens=len(event.prompt), seed=event.seed, max_new_tokens=event.max_new_tokens,
            branches=[BRANCHES[b] for b in event.branches]))
    raise TypeError(f"not a Generate event: {type(event).__name__}")


def score_response(result: ScoreResult) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        num_tokens=len(result.token_ids), scored_tokens=result.scored_tokens, token_ids=result.token_ids,
        clean_ce=result.clean_ce, edited_ce=result.edited_ce, kl=result.kl, edited=result.edited,
        clean_ce_per_token=result.clean_ce_per_token, edited_ce_per_token=result.edited_ce_per_token,
        kl_per_token=result.kl_per_token)


def feature_response(info: FeatureInfo, stack: ServedStack) -> pb.GetFeatureResponse:
    def scores(tokens):
        return [pb.TokenScore(id=s.id, text=s.text, score=s.score) for s in tokens]

    msg = pb.GetFeatureResponse(
        stack=info.stack, stage=stack.loaded.stages[info.stage].name, stage_index=info.stage, feature=info.feature,
        decoder_norm=info.decoder_norm, top_tokens=scores(info.top_tokens), bottom_tokens=scores(info.bottom_tokens),
        top_examples=[pb.FeatureExample(text=x, position=p, value=v) for x, p, v in info.top_examples])
    if info.density is not None:
        msg.density = info.density
    return msg


def encode_response(sequence: int, rows: Sequence[StageCodes]) -> pb.EncodeActivationsResponse:
    return pb.EncodeActivationsResponse(sequence=sequence, rows=[stage_codes(c) for c in rows])


def tokenize_response(ids: Sequence[int], tokens: Sequence[str]) -> pb.TokenizeResponse:
    return pb.TokenizeResponse(ids=ids, tokens=tokens)


# --------------------------------------------------------------------------------------- server info


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
    """Whether a stage carries an optional record (density, top examples) in its extras or extra tensors."""
    return key in (stage.extras or {}) or key in (stage.extra_tensors or {})


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
            has_top_examples=_stage_record(s, "top_examples"), metrics=numeric_metrics(s.metrics))
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

    return {m: n for n, m in _table(pb.HookpointKind, "HOOKPOINT_KIND_", HookKind).items()}


def _model_info(host: HostModel) -> pb.ModelInfo:
    from core.stack.identity import model_fingerprint

    summary = host.summary()
    return pb.ModelInfo(name=summary.name, architecture=summary.model_type, num_layers=summary.num_layers,
                        d_model=summary.d_model, vocab_size=summary.vocab_size, dtype=summary.dtype,
                        device=summary.device, fingerprint=model_fingerprint(host.model))


def _limits(config: ServerConfig) -> pb.Limits:
    limits = Limits.from_config(config)
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
