"""The `featurewire` object of an OpenAI body (what `extra_body={"featurewire": {...}}` sends): steering, conditions,
per-token monitoring and the default branch, in the gateway's vocabulary.

Its fields are GenerateRequest's in the proto3 JSON mapping (lowerCamelCase or the .proto names), so a request
written for `POST /v1/Generate` moves over unchanged:

- `stack`, `interventions`, `steering_vectors` (`steeringVectors`), `conditions`: as in Generate;
- `decompose` (DecomposeOptions: `stages`, `topK`, `includeError`, `featureFilter`): monitoring, the features
  of the chosen stages for every generated token, returned in the `featurewire` field of each chunk or choice;
- `default_branch` (`defaultBranch`): also return the unsteered continuation (Generate's `with_default`);
- `top_k` (`topK`) and `ignore_eos` (`ignoreEos`): the sampling options OpenAI's API has no field for.

The prompt and the other sampling options come from the OpenAI fields; naming them here is refused with the
field to use instead, and so is any other key (json_format refuses unknown fields inside the messages too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from featurewire.v1 import featurewire_pb2 as pb
from google.protobuf import json_format

from service.http.openai.errors import bad_request

PARAM = "featurewire"
GENERATE_FIELDS = {"stack": "stack", "interventions": "interventions", "steering_vectors": "steering_vectors",
                   "steeringVectors": "steering_vectors", "conditions": "conditions", "decompose": "decompose"}
OWN_FIELDS = ("default_branch", "defaultBranch", "top_k", "topK", "ignore_eos", "ignoreEos")
INSTEAD = {"prompt": "the prompt (completions) or messages (chat)", "sampling": "temperature, top_p, seed, stop "
           "and max_tokens (and featurewire.top_k, featurewire.ignore_eos)",
           "with_default": "featurewire.default_branch", "withDefault": "featurewire.default_branch"}


@dataclass(frozen=True)
class Steering:
    """What the `featurewire` object asks for; `request` holds its Generate fields (no prompt, no sampling)."""

    given: bool = False
    request: pb.GenerateRequest = field(default_factory=pb.GenerateRequest)

    @property
    def monitor(self) -> bool:
        """Per-token features were asked for (`decompose`)."""
        return self.request.HasField("decompose")

    @property
    def default_branch(self) -> bool:
        return self.request.with_default


def parse_featurewire(value: Any, sampling: pb.SamplingParams) -> Steering:
    """The Generate fields of a `featurewire` object; sets top_k and ignore_eos on `sampling`."""
    if value is None:
        return Steering()
    if not isinstance(value, dict):
        raise bad_request(f"featurewire must be an object, got {type(value).__name__}", PARAM)
    for key in value:
        if key in INSTEAD:
            raise bad_request(f"featurewire.{key} is not read here: use {INSTEAD[key]}", PARAM)
        if key not in GENERATE_FIELDS and key not in OWN_FIELDS:
            known = ", ".join(sorted({*GENERATE_FIELDS, *OWN_FIELDS}))
            raise bad_request(f"featurewire.{key} is not a field; featurewire takes: {known}", PARAM)
    request = pb.GenerateRequest()
    try:
        json_format.ParseDict({k: v for k, v in value.items() if k in GENERATE_FIELDS}, request)
    except Exception as exc:  # json_format.ParseError mostly: the JSON does not fit GenerateRequest
        raise bad_request(f"featurewire is not valid: {exc}", PARAM) from None
    request.with_default = _flag(value, "default_branch", "defaultBranch")
    sampling.ignore_eos = _flag(value, "ignore_eos", "ignoreEos")
    top_k = _one_of(value, "top_k", "topK")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k < 2**32:
            raise bad_request(f"featurewire.top_k must be a non-negative integer (0 = off), got {top_k!r}", PARAM)
        sampling.top_k = top_k
    return Steering(True, request)


def _one_of(value: dict[str, Any], snake: str, camel: str) -> Any:
    if snake in value and camel in value:
        raise bad_request(f"featurewire.{snake} and featurewire.{camel} are the same field; send one", PARAM)
    return value.get(snake, value.get(camel))


def _flag(value: dict[str, Any], snake: str, camel: str) -> bool:
    flag = _one_of(value, snake, camel)
    if flag is None:
        return False
    if not isinstance(flag, bool):
        raise bad_request(f"featurewire.{snake} must be true or false, got {flag!r}", PARAM)
    return flag
