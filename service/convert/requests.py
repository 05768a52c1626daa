"""Request messages -> validated engine specs.

Plain values are pulled out of the messages (presence kept where the proto declares it, enums mapped by
name to the spec enums, UNSPECIFIED -> None, an unknown enum number -> InvalidRequest naming the field)
and handed to `RequestValidator` / `EncodeValidator`, which check them and build the specs. Why split
extraction from validation: the validators stay transport-free and testable without protobuf.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import types_pb2 as t

from core.errors import InvalidRequest
from service.convert.enums import (
    ACTIONS,
    COMPARISONS,
    DTYPES,
    FEATURE_SORTS,
    OPS,
    REDUCTIONS,
    SCOPES,
    TOKEN_DIRECTIONS,
    E,
)
from service.engine.contract.encode_spec import EncodeSpec, MatrixIn
from service.engine.contract.feature_specs import ListSpec, SearchSpec
from service.engine.contract.inputs import (
    ConditionIn,
    DecomposeOptionsIn,
    InputIn,
    InterventionIn,
    ListFeaturesIn,
    PositionsIn,
    SamplingIn,
    SearchIn,
    SpanIn,
    SteeringIn,
    TextQueryIn,
    TokenQueryIn,
)
from service.engine.contract.specs import DecomposeSpec, GenerateSpec, ScoreSpec

if TYPE_CHECKING:
    from service.engine.contract.encode_spec import EncodeValidator
    from service.engine.contract.validation import RequestValidator
    from service.engine.stacks.served import ServedStack


def _enum(number: int, table: Mapping[int, E], wrapper: Any, field: str) -> E | None:
    """UNSPECIFIED (0) -> None; an unknown number (a newer client, a hand-made message) -> InvalidRequest."""
    if number == 0:
        return None
    if number not in table:
        choices = ", ".join(wrapper.Name(n) for n in table)
        raise InvalidRequest(f"{field} has unknown value {number}; valid: {choices}")
    return table[number]


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


def _text_query(msg: pb.TextQuery) -> TextQueryIn:
    return TextQueryIn(text=msg.text, span=SpanIn(msg.span.start, msg.span.end) if msg.HasField("span") else None,
                       reduction=_enum(msg.reduction, REDUCTIONS, pb.Reduction, "text.reduction"),
                       add_special_tokens=msg.add_special_tokens if msg.HasField("add_special_tokens") else None)


def _token_query(msg: pb.TokenQuery) -> TokenQueryIn:
    which = msg.WhichOneof("token")
    return TokenQueryIn(text=msg.text if which == "text" else None, id=msg.id if which == "id" else None,
                        direction=_enum(msg.direction, TOKEN_DIRECTIONS, pb.TokenDirection, "token.direction"))


def search_spec(req: pb.SearchFeaturesRequest, v: RequestValidator) -> SearchSpec:
    which = req.WhichOneof("query")
    return v.search_features(SearchIn(
        stack=req.stack, text=_text_query(req.text) if which == "text" else None,
        token=_token_query(req.token) if which == "token" else None,
        explanation=req.explanation if which == "explanation" else None, stages=tuple(req.stages),
        page_size=req.page_size, page_token=req.page_token))


def list_spec(req: pb.ListFeaturesRequest, v: RequestValidator) -> ListSpec:
    return v.list_features(ListFeaturesIn(
        stack=req.stack, stage=req.stage, min_density=req.min_density if req.HasField("min_density") else None,
        max_density=req.max_density if req.HasField("max_density") else None,
        sort=_enum(req.sort, FEATURE_SORTS, pb.FeatureSort, "sort"), descending=req.descending,
        page_size=req.page_size, page_token=req.page_token, steerable_only=req.steerable_only))


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
