"""The fields of an OpenAI completion or chat body: which are read, which are accepted at their neutral value only,
which are ignored, and the checks that name the OpenAI field at fault.

Unknown fields are refused (400 `unrecognized request argument`), as OpenAI's own API does: a misspelt
`temprature` or a sampling option this server does not implement must not be dropped silently, since the
answer would then differ from what the caller asked for. Fields OpenAI defines that change nothing here
(`user`, `metadata`, `store`, `service_tier`, `parallel_tool_calls`) are accepted and ignored; fields this
server does not implement are accepted only at their neutral value (`frequency_penalty: 0`, `logit_bias: {}`,
`tools: []`, `response_format: {"type": "text"}`, ...), which is what many clients send by default. `null`
means "not given" for every optional field, as in OpenAI's API.

The checks here are the ones whose message should name an OpenAI field (`max_tokens`, not
`sampling.max_new_tokens`); everything else (token ids against the vocabulary, interventions, conditions)
is checked by the server's one validator on the Generate call and its message passed on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import types_pb2

from service.engine.contract.inputs import MAX_SEED, MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TEMPERATURE, Limits
from service.http.openai.errors import bad_request
from service.http.openai.steering import Steering, parse_featurewire

COMPLETION, CHAT = "completion", "chat"
SHARED = ("model", "n", "stream", "stream_options", "max_tokens", "temperature", "top_p", "seed", "stop",
          "logprobs", "featurewire")
READ = {COMPLETION: SHARED + ("prompt", "echo"), CHAT: SHARED + ("messages", "max_completion_tokens", "top_logprobs")}
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "suffix": ("",), "best_of": (1,),
    "tools": ([],), "tool_choice": ("none", "auto"), "response_format": ({"type": "text"},), "functions": ([],),
    "function_call": ("none", "auto"), "modalities": (["text"],),
}
"""Fields OpenAI defines that this server does not implement, with the values that mean "off" (besides null)."""
NEUTRAL_FIELDS = {COMPLETION: ("frequency_penalty", "presence_penalty", "logit_bias", "suffix", "best_of"),
                  CHAT: ("frequency_penalty", "presence_penalty", "logit_bias", "tools", "tool_choice",
                         "response_format", "functions", "function_call", "modalities")}


@dataclass(frozen=True)
class Request:
    """One completion or chat request, checked; prompts are filled in for chat once the template has run."""

    kind: str
    model: str
    prompts: tuple[types_pb2.Input, ...]
    echo_texts: tuple[str | None, ...]
    messages: tuple[dict[str, Any], ...]
    n: int
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: bool
    sampling: pb.SamplingParams
    steering: Steering = field(default_factory=Steering)

    @property
    def choices(self) -> int:
        """Steered choices: n per prompt (the default branches, when asked for, come after them)."""
        return self.n * len(self.prompts)


def parse_request(kind: str, body: Any, limits: Limits, max_choices: int) -> Request:
    """Check a parsed JSON body of `kind` (COMPLETION or CHAT) and return what it asks for."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    _refuse_unknown(kind, body)
    given = {k: v for k, v in body.items() if v is not None}
    model = given.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required: one of the ids GET /models lists", "model")
    n = _integer(given, "n", 1, 1, max_choices, f"(at most {max_choices} choices per request, n × prompts: the "
                                                 "server's max_batch_size)")
    stream = _boolean(given, "stream", False)
    include_usage = _stream_options(given, stream)
    sampling = _sampling(kind, given, limits)
    logprobs = _logprobs(kind, given)
    echo = _boolean(given, "echo", False)
    if echo and logprobs:
        raise bad_request("echo with logprobs is not supported: the server reports log-probabilities of generated "
                          "tokens only", "echo")
    steering = parse_featurewire(body.get("featurewire"), sampling)
    if kind == COMPLETION:
        prompts, echo_texts = _prompts(given.get("prompt"))
        messages: tuple[dict[str, Any], ...] = ()
    else:
        prompts, echo_texts, messages = (), (), _messages(given.get("messages"))
    if kind == COMPLETION and n * len(prompts) > max_choices:
        raise bad_request(f"{len(prompts)} prompts × n {n} = {n * len(prompts)} choices; at most {max_choices} per "
                          "request (the server's max_batch_size)", "n")
    return Request(kind, model, prompts, echo_texts, messages, n, stream, include_usage, echo, logprobs, sampling,
                   steering)


def _refuse_unknown(kind: str, body: Mapping[str, Any]) -> None:
    read, neutral = READ[kind], NEUTRAL_FIELDS[kind]
    for name, value in body.items():
        if name in read or name in IGNORED:
            continue
        if name in neutral:
            if value is not None and value not in NEUTRAL[name]:
                allowed = " or ".join(repr(v) for v in NEUTRAL[name])
                raise bad_request(f"{name} is not supported by this server; leave it out or send null or {allowed}",
                                  name)
            continue
        known = ", ".join(sorted({*read, *IGNORED, *neutral}))
        raise bad_request(f"unrecognized request argument supplied: {name!r}; {_path(kind)} takes: {known}", name)


def _path(kind: str) -> str:
    return "/completions" if kind == COMPLETION else "/chat/completions"


def _integer(given: Mapping[str, Any], name: str, default: int, lo: int, hi: int, why: str = "") -> int:
    value = given.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{name} must be an integer, got {_json_type(value)}", name)
    if not lo <= value <= hi:
        raise bad_request(f"{name} {value} is out of range: {lo}..{hi}" + (f" {why}" if why else ""), name)
    return value


def _number(given: Mapping[str, Any], name: str, default: float, lo: float, hi: float, *, open_lo: bool = False
            ) -> float:
    value = given.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(f"{name} must be a number, got {_json_type(value)}", name)
    try:
        value = float(value)
    except OverflowError:  # an integer literal past float's range
        value = math.inf
    if not math.isfinite(value) or value > hi or value < lo or (open_lo and value == lo):
        raise bad_request(f"{name} {value} is out of range: {'(' if open_lo else '['}{lo:g}, {hi:g}]", name)
    return value


def _boolean(given: Mapping[str, Any], name: str, default: bool) -> bool:
    value = given.get(name, default)
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, got {_json_type(value)}", name)
    return value


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _stream_options(given: Mapping[str, Any], stream: bool) -> bool:
    options = given.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise bad_request("stream_options must be an object with one field, include_usage (true or false)",
                          "stream_options")
    return _boolean(options, "include_usage", False)


def _sampling(kind: str, given: Mapping[str, Any], limits: Limits) -> pb.SamplingParams:
    cap = limits.max_new_tokens
    name = "max_tokens"
    if kind == CHAT and "max_completion_tokens" in given:
        if "max_tokens" in given and given["max_tokens"] != given["max_completion_tokens"]:
            raise bad_request("max_tokens and max_completion_tokens differ; send max_completion_tokens only",
                              "max_tokens")
        name = "max_completion_tokens"
    max_tokens = _integer(given, name, limits.default_max_new_tokens, 1, cap,
                          "(the server's max_new_tokens; unset = its default "
                          f"{limits.default_max_new_tokens})")
    sampling = pb.SamplingParams(
        max_new_tokens=max_tokens, temperature=_number(given, "temperature", 1.0, 0.0, MAX_TEMPERATURE),
        top_p=_number(given, "top_p", 1.0, 0.0, 1.0, open_lo=True), stop=_stops(given.get("stop")))
    if "seed" in given:
        sampling.seed = _integer(given, "seed", 0, 0, MAX_SEED)
    return sampling


def _stops(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("stop must be a string or an array of strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"stop has {len(stops)} strings; at most {MAX_STOP_STRINGS}", "stop")
    for i, stop in enumerate(stops):
        if not 0 < len(stop) <= MAX_STOP_CHARS:
            raise bad_request(f"stop[{i}] has {len(stop)} characters; each stop string needs 1..{MAX_STOP_CHARS}",
                              "stop")
    return stops


def _logprobs(kind: str, given: Mapping[str, Any]) -> bool:
    """Each generated token's own log-probability; top alternatives are not computed, so none can be asked for."""
    if kind == COMPLETION:
        if "logprobs" not in given:
            return False
        count = _integer(given, "logprobs", 0, 0, 5)
        if count:
            raise bad_request(f"logprobs {count}: only 0 is supported (each token's own log-probability; this "
                              "server does not compute the top alternatives)", "logprobs")
        return True
    wanted = _boolean(given, "logprobs", False)
    top = _integer(given, "top_logprobs", 0, 0, 20)
    if top:
        raise bad_request(f"top_logprobs {top}: only 0 is supported (logprobs: true gives each token's own "
                          "log-probability; this server does not compute the top alternatives)", "top_logprobs")
    return wanted


def _prompts(value: Any) -> tuple[tuple[types_pb2.Input, ...], tuple[str | None, ...]]:
    """A string, an array of strings, an array of token ids or an array of such arrays."""
    if isinstance(value, str):
        return (types_pb2.Input(text=value),), (value,)
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return tuple(types_pb2.Input(text=v) for v in value), tuple(value)
        if all(_is_id(v) for v in value):
            return (_ids(value),), (None,)
        if all(isinstance(v, list) and v and all(_is_id(i) for i in v) for v in value):
            return tuple(_ids(v) for v in value), (None,) * len(value)
    raise bad_request("prompt is required: a string, an array of strings, an array of token ids (each 0 <= id < "
                      "2^32) or an array of non-empty such arrays", "prompt")


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32


def _ids(ids: list[int]) -> types_pb2.Input:
    return types_pb2.Input(token_ids=types_pb2.TokenIds(ids=ids))


ROLES = ("system", "developer", "user", "assistant")


def _messages(value: Any) -> tuple[dict[str, Any], ...]:
    """Chat messages as the template reads them: {role, content (a string)} and `name` when given."""
    if not isinstance(value, list) or not value:
        raise bad_request("messages is required: a non-empty array of {role, content}", "messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object {{role, content}}, got {_json_type(message)}", "messages")
        extra = set(message) - {"role", "content", "name"}
        if extra:
            raise bad_request(f"{where} has fields this server does not read: {', '.join(sorted(extra))}; "
                              "messages take role, content and name", "messages")
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", "messages")
        item = {"role": role, "content": _content(message.get("content"), where)}
        if message.get("name") is not None:
            if not isinstance(message["name"], str):
                raise bad_request(f"{where}.name must be a string", "messages")
            item["name"] = message["name"]
        out.append(item)
    return tuple(out)


def _content(content: Any, where: str) -> str:
    """A string, or an array of text parts (joined); other part types (images, audio) are refused."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad_request(f"{where}.content[{j}] must be a text part {{\"type\": \"text\", \"text\": ...}}; "
                                  "this server reads text only", "messages")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"{where}.content must be a string or an array of text parts", "messages")
