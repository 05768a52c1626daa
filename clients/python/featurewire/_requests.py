"""Each RPC as both clients make it, so Client and AsyncClient build the same wire from the same arguments.

A function per RPC turns Python arguments into a `Call`: the stub method, the request message and how a
unary response becomes a result. The clients only add the transport (sync or asyncio); stream results
come from the readers in `events`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from featurewire import events as ev
from featurewire import feature_results as fr
from featurewire import results as rs
from featurewire.arrays import matrix
from featurewire.builders import Condition, DecomposeOptions, Edit, decompose_options, split_edits
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import types_pb2 as t

TextOrIds = str | Sequence[int]


def _unchanged(message: Any) -> Any:
    return message


@dataclass(frozen=True)
class Call:
    """One RPC ready to send; `retry`: idempotent, so retried on UNAVAILABLE (a stream: until its first message)."""

    method: str
    request: Any
    convert: Callable[[Any], Any] = _unchanged
    retry: bool = True


# -- arguments shared by several RPCs ------------------------------------------------------------------


def _special_tokens(msg: Any, add_special_tokens: bool | None) -> Any:
    """Set only when given: unset leaves the choice to the server's tokenizer."""
    if add_special_tokens is not None:
        msg.add_special_tokens = add_special_tokens
    return msg


def text_input(source: TextOrIds, add_special_tokens: bool | None = None) -> t.Input:
    """A text (tokenized by the server) or token ids (used verbatim)."""
    if isinstance(source, str):
        return _special_tokens(t.Input(text=source), add_special_tokens)
    if add_special_tokens is not None:
        raise ValueError("add_special_tokens applies to text only; token ids are used verbatim")
    ids = source.tolist() if hasattr(source, "tolist") else source
    return t.Input(token_ids=t.TokenIds(ids=[int(i) for i in ids]))


SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")


def sampling(options: dict[str, Any]) -> pb.SamplingParams:
    """generate()'s **sampling keywords; a misspelt one fails here rather than being silently ignored."""
    unknown = set(options) - set(SAMPLING_KEYS)
    if unknown:
        raise TypeError(f"unknown sampling option(s) {sorted(unknown)}; valid: {', '.join(SAMPLING_KEYS)}")
    stop = options.get("stop") or ()
    msg = pb.SamplingParams(max_new_tokens=int(options.get("max_new_tokens") or 0),
                            temperature=float(options.get("temperature") or 0.0),
                            top_p=float(options.get("top_p") or 0.0), top_k=int(options.get("top_k") or 0),
                            stop=[stop] if isinstance(stop, str) else list(stop),
                            ignore_eos=bool(options.get("ignore_eos", False)))
    if options.get("seed") is not None:
        msg.seed = int(options["seed"])
    return msg


def _names(value: Sequence[str] | str | None) -> list[str]:
    """One name or several: a lone string is one name, not its characters."""
    return [value] if isinstance(value, str) else list(value or ())


# -- unary ---------------------------------------------------------------------------------------------


def info() -> Call:
    return Call("GetServerInfo", pb.GetServerInfoRequest(), rs.server_info)


def _stacks(message: pb.ListStacksResponse) -> tuple[rs.StackInfo, ...]:
    return tuple(rs.stack_info(s) for s in message.stacks)


def stacks() -> Call:
    return Call("ListStacks", pb.ListStacksRequest(), _stacks)


def feature(stack: str, stage: str, feature: int, top_n: int) -> Call:
    return Call("GetFeature", pb.GetFeatureRequest(stack=stack, stage=stage, feature=int(feature), top_n=top_n),
                rs.feature)


def _choice(value: str, table: dict[str, int], name: str) -> int:
    """A short lower-case option ("max", "density") -> its proto number; anything else fails here."""
    number = table.get(value.lower()) if isinstance(value, str) else None
    if number is None:
        raise ValueError(f"{name} must be one of {', '.join(table)}, got {value!r}")
    return number


REDUCTIONS = {"max": pb.REDUCTION_MAX, "mean": pb.REDUCTION_MEAN}
DIRECTIONS = {"promotes": pb.TOKEN_DIRECTION_PROMOTES, "suppresses": pb.TOKEN_DIRECTION_SUPPRESSES}
SORTS = {"density": pb.FEATURE_SORT_DENSITY, "max": pb.FEATURE_SORT_MAX, "label_f1": pb.FEATURE_SORT_LABEL_F1,
         "steering": pb.FEATURE_SORT_STEERING, "output_score": pb.FEATURE_SORT_OUTPUT_SCORE,
         "explanation_score": pb.FEATURE_SORT_EXPLANATION_SCORE}


def search_features(*, text: str | None, span: tuple[int, int] | None, token: str | int | None,
                    explanation: str | None, stages: Sequence[str] | str | None, reduce: str, direction: str,
                    stack: str, page_size: int, page_token: str, add_special_tokens: bool | None) -> Call:
    """Exactly one of text (optionally a character span [start, end) of it), token (a one-token string or an id)
    and explanation (words)."""
    given = [name for name, value in (("text", text), ("token", token), ("explanation", explanation))
             if value is not None]
    if len(given) != 1:
        raise ValueError(f"pass exactly one of text, token and explanation (got {', '.join(given) or 'none'})")
    if span is not None and text is None:
        raise ValueError("span applies to a text search only")
    request = pb.SearchFeaturesRequest(stack=stack, stages=_names(stages), page_size=page_size,
                                       page_token=page_token)
    if text is not None:
        query = _special_tokens(pb.TextQuery(text=text, reduction=_choice(reduce, REDUCTIONS, "reduce")),
                                add_special_tokens)
        if span is not None:
            start, end = span
            query.span.CopyFrom(pb.Span(start=int(start), end=int(end)))
        request.text.CopyFrom(query)
    elif token is not None:
        query = pb.TokenQuery(direction=_choice(direction, DIRECTIONS, "direction"))
        if isinstance(token, str):
            query.text = token
        else:
            query.id = int(token)
        request.token.CopyFrom(query)
    else:
        request.explanation = explanation or ""
    return Call("SearchFeatures", request, fr.search_result)


def list_features(stage: str, *, min_density: float | None, max_density: float | None, sort: str,
                  descending: bool, stack: str, page_size: int, page_token: str, steerable_only: bool = False) -> Call:
    request = pb.ListFeaturesRequest(stack=stack, stage=stage, sort=_choice(sort, SORTS, "sort"),
                                     descending=descending, page_size=page_size, page_token=page_token,
                                     steerable_only=steerable_only)
    if min_density is not None:
        request.min_density = float(min_density)
    if max_density is not None:
        request.max_density = float(max_density)
    return Call("ListFeatures", request, fr.feature_list)


def tokenize(text: str, add_special_tokens: bool | None) -> Call:
    return Call("Tokenize", _special_tokens(pb.TokenizeRequest(text=text), add_special_tokens), rs.tokens)


def score(text: TextOrIds, *, interventions: Iterable[Edit], splice: Sequence[str] | str, stack: str,
          add_special_tokens: bool | None) -> Call:
    edits, vectors = split_edits(interventions, ())
    request = pb.ScoreRequest(stack=stack, input=text_input(text, add_special_tokens),
                              interventions=[e.to_proto() for e in edits],
                              steering_vectors=[v.to_proto() for v in vectors], splice_stages=_names(splice))
    return Call("Score", request, rs.score)


# -- streams: results come from events.DecomposeReader / GenerateReader ---------------------------------


def decompose(text: TextOrIds, *, stages: Sequence[str] | str | None, top_k: int, include_error: bool,
              always: dict[str, Sequence[int]] | None, stack: str, chunk_tokens: int,
              add_special_tokens: bool | None) -> Call:
    options = DecomposeOptions(stages=tuple(_names(stages)), top_k=top_k, include_error=include_error,
                               always=always or {})
    return Call("Decompose", pb.DecomposeRequest(stack=stack, input=text_input(text, add_special_tokens),
                                                 options=options.to_proto(), chunk_tokens=chunk_tokens))


def generate(prompt: TextOrIds, *, interventions: Iterable[Edit], conditions: Iterable[Condition], decompose: Any,
             with_default: bool, stack: str, add_special_tokens: bool | None, options: dict[str, Any]) -> Call:
    """Edits that a condition enables travel with that condition's id (split_edits)."""
    conditions = list(conditions)
    edits, vectors = split_edits(interventions, conditions)
    request = pb.GenerateRequest(
        stack=stack, prompt=text_input(prompt, add_special_tokens), sampling=sampling(options),
        interventions=[e.to_proto() for e in edits], steering_vectors=[v.to_proto() for v in vectors],
        conditions=[c.to_proto() for c in conditions], with_default=with_default)
    features = decompose_options(decompose)
    if features is not None:
        request.decompose.CopyFrom(features.to_proto())
    return Call("Generate", request)


class Encoder:
    """EncodeActivations, one per call: numbers requests from 0 and pairs each array with the next of `previous`
    (residual stages), so the sync request iterator and the async writer send the same messages. Not retried:
    the request stream is consumed as it is sent."""

    method = "EncodeActivations"

    def __init__(self, *, stage: str, stack: str, previous: Iterable[Any] | None, top_k: int,
                 include_error: bool) -> None:
        self.stage = stage
        self._fields = {"stage": stage, "stack": stack, "top_k": top_k, "include_error": include_error}
        self._previous = None if previous is None else iter(previous)
        self._sequence = 0

    def request(self, array: Any) -> pb.EncodeActivationsRequest:
        """The next request, for one (rows, d_in) array."""
        msg = pb.EncodeActivationsRequest(sequence=self._sequence, activations=matrix(array), **self._fields)
        if self._previous is not None:
            msg.previous.CopyFrom(matrix(next(self._previous)))
        self._sequence += 1
        return msg

    def result(self, message: pb.EncodeActivationsResponse) -> ev.EncodedBatch:
        return ev.encoded_batch(message, self.stage)
