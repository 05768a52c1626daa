"""Request messages from Python arguments, shared by Client and AsyncClient so both build the same wire."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from featurewire.arrays import matrix
from featurewire.builders import Condition, DecomposeOptions, Edit, decompose_options, split_edits
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import types_pb2 as t

TextOrIds = str | Sequence[int]


def text_input(source: TextOrIds, add_special_tokens: bool | None = None) -> t.Input:
    """A text (tokenized by the server) or token ids (used verbatim)."""
    if isinstance(source, str):
        msg = t.Input(text=source)
        if add_special_tokens is not None:
            msg.add_special_tokens = add_special_tokens
        return msg
    if add_special_tokens is not None:
        raise ValueError("add_special_tokens applies to text only; token ids are used verbatim")
    ids = source.tolist() if hasattr(source, "tolist") else source
    return t.Input(token_ids=t.TokenIds(ids=[int(i) for i in ids]))


def decompose_request(text: TextOrIds, *, stack: str, stages: Sequence[str] | str | None, top_k: int,
                      include_error: bool, always: dict[str, Sequence[int]] | None, chunk_tokens: int,
                      add_special_tokens: bool | None) -> pb.DecomposeRequest:
    stage_names = (stages,) if isinstance(stages, str) else tuple(stages or ())
    options = DecomposeOptions(stages=stage_names, top_k=top_k, include_error=include_error, always=always or {})
    return pb.DecomposeRequest(stack=stack, input=text_input(text, add_special_tokens), options=options.to_proto(),
                               chunk_tokens=chunk_tokens)


SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")


def sampling(options: dict[str, Any]) -> pb.SamplingParams:
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


def generate_request(prompt: TextOrIds, *, stack: str, interventions: Iterable[Edit],
                     conditions: Iterable[Condition], decompose: Any, with_default: bool,
                     add_special_tokens: bool | None, options: dict[str, Any]) -> pb.GenerateRequest:
    conditions = list(conditions)
    edits, vectors = split_edits(interventions, conditions)
    request = pb.GenerateRequest(
        stack=stack, prompt=text_input(prompt, add_special_tokens), sampling=sampling(options),
        interventions=[e.to_proto() for e in edits], steering_vectors=[v.to_proto() for v in vectors],
        conditions=[c.to_proto() for c in conditions], with_default=with_default)
    features = decompose_options(decompose)
    if features is not None:
        request.decompose.CopyFrom(features.to_proto())
    return request


def score_request(text: TextOrIds, *, stack: str, interventions: Iterable[Edit], splice: Sequence[str] | str,
                  add_special_tokens: bool | None) -> pb.ScoreRequest:
    edits, vectors = split_edits(interventions, ())
    return pb.ScoreRequest(stack=stack, input=text_input(text, add_special_tokens),
                           interventions=[e.to_proto() for e in edits],
                           steering_vectors=[v.to_proto() for v in vectors],
                           splice_stages=[splice] if isinstance(splice, str) else list(splice))


def feature_request(stack: str, stage: str, feature: int, top_n: int) -> pb.GetFeatureRequest:
    return pb.GetFeatureRequest(stack=stack, stage=stage, feature=int(feature), top_n=top_n)


def tokenize_request(text: str, add_special_tokens: bool | None) -> pb.TokenizeRequest:
    msg = pb.TokenizeRequest(text=text)
    if add_special_tokens is not None:
        msg.add_special_tokens = add_special_tokens
    return msg


def encode_requests(arrays: Iterable[Any], *, stage: str, stack: str, previous: Iterable[Any] | None, top_k: int,
                    include_error: bool) -> Iterator[pb.EncodeActivationsRequest]:
    """One request per (rows, d_in) array, numbered from 0; `previous` runs in step for residual stages."""
    previous_iter = iter(previous) if previous is not None else None
    for sequence, array in enumerate(arrays):
        msg = pb.EncodeActivationsRequest(sequence=sequence, stack=stack, stage=stage, activations=matrix(array),
                                          top_k=top_k, include_error=include_error)
        if previous_iter is not None:
            msg.previous.CopyFrom(matrix(next(previous_iter)))
        yield msg
