"""Generate events to OpenAI choices: the chunks of a stream and the body of a whole response.

One Generate call runs per steered choice (n per prompt); choice i is call i's STEERED branch. With
`featurewire.default_branch`, call i's DEFAULT branch (the unsteered continuation, same seed and sampling) is
choice `choices + i`, after every steered one, so `choices[:n]` is what an OpenAI client asked for and the
`featurewire.branch` of each choice says which is which (`pairedWith` names the other half of the pair).

The `featurewire` field (on a choice, or on each chunk's choice) is present when the request carried a
`featurewire` object. Its contents are in the gateway's proto3 JSON vocabulary: `branch`, the token's
`tokenId`, `position` and `features` (StageCodes with `stage` and `stageName`, when monitoring was asked for),
`condition` events as they fire, `finish` (the FinishEvent: reason, trigger, stopString) and `seed`.

Log-probabilities are each generated token's own, under the (edited) model's distribution before temperature
and top-p; the top alternatives are not computed, so `top_logprobs` is null (completions) or [] (chat).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import types_pb2

from service.http.jsonmap import message_to_dict
from service.http.openai.fields import CHAT, Request

FINISH_REASONS = {pb.FINISH_REASON_LENGTH: "length"}  # every other reason ends the text before the limit: "stop"
STEERED, DEFAULT = types_pb2.BRANCH_STEERED, types_pb2.BRANCH_DEFAULT
BRANCH_NAMES = {STEERED: "BRANCH_STEERED", DEFAULT: "BRANCH_DEFAULT"}


@dataclass
class Choice:
    """One choice as it accumulates: its text, per-token log-probabilities and monitoring, its finish."""

    index: int
    branch: int
    paired_with: int | None
    text: list[str] = field(default_factory=list)
    offset: int = 0
    tokens: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    monitored: list[dict[str, Any]] = field(default_factory=list)
    conditions: list[dict[str, Any]] = field(default_factory=list)
    finish: pb.FinishEvent | None = None
    seed: int = 0


class Answer:
    """The choices of one request and the JSON that reports them, streamed or whole."""

    def __init__(self, request: Request, model: str, request_id: str, token_text: Callable[[int], str]) -> None:
        self.request, self.model, self.token_text = request, model, token_text
        chat = request.kind == CHAT
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.created = int(time.time())
        calls = request.choices
        default = request.steering.default_branch
        self.steered = [Choice(i, STEERED, calls + i if default else None) for i in range(calls)]
        self.defaults = [Choice(calls + i, DEFAULT, i) for i in range(calls)] if default else []
        self.prompt_tokens = [0] * len(request.prompts)
        self.stage_names: dict[int, str] = {}
        self.header: pb.GenerateHeader | None = None

    @property
    def choices(self) -> list[Choice]:
        return self.steered + self.defaults

    def _choice(self, call: int, branch: int) -> Choice:
        return self.defaults[call] if branch == DEFAULT else self.steered[call]

    # -- events ------------------------------------------------------------------------------------------
    def on_header(self, call: int, header: pb.GenerateHeader) -> None:
        self.header = self.header or header
        self.prompt_tokens[call // self.request.n] = header.prompt_tokens
        self.stage_names = {s.index: s.name for s in header.stages}
        for choice in (self.steered[call], *(self.defaults[call:call + 1])):
            choice.seed = header.seed
            if self.request.echo:
                echo = self.request.echo_texts[call // self.request.n]
                choice.text.append(echo if echo is not None else "".join(t.text for t in header.prompt))
                choice.offset = len(choice.text[0])

    def on_event(self, call: int, event: pb.GenerateResponse) -> dict[str, Any] | None:
        """Record one event; returns the chunk choice it streams as (None: nothing to send for it)."""
        kind = event.WhichOneof("event")
        if kind == "token":
            return self._token(self._choice(call, event.token.branch), event.token)
        if kind == "condition":
            choice = self._choice(call, event.condition.branch)
            condition = message_to_dict(event.condition)
            choice.conditions.append(condition)
            return self._chunk_choice(choice, "", featurewire={"condition": condition})
        if kind == "finish":
            choice = self._choice(call, event.finish.branch)
            choice.finish = event.finish
            return self._chunk_choice(choice, "", finish=self._finish_reason(choice),
                                      featurewire={"finish": self._finish_json(event.finish)})
        return None

    def _token(self, choice: Choice, token: pb.TokenEvent) -> dict[str, Any] | None:
        text = token.text
        if text:
            choice.text.append(text)
        logprob = None
        if self.request.logprobs:
            logprob = (self.token_text(token.token_id), token.logprob, choice.offset)
            choice.tokens.append(logprob[0])
            choice.logprobs.append(token.logprob)
            choice.offsets.append(choice.offset)
        choice.offset += len(text)
        monitored = None
        if self.request.steering.monitor:
            monitored = {"tokenId": token.token_id, "position": token.position,
                         "features": [self._features(codes) for codes in token.features]}
            choice.monitored.append({**monitored, "text": text, "logprob": token.logprob})
        if not text and logprob is None and monitored is None:
            return None
        return self._chunk_choice(choice, text, logprob=logprob, featurewire=monitored)

    def _features(self, codes: types_pb2.StageCodes) -> dict[str, Any]:
        out = message_to_dict(codes)
        out["stage"] = codes.stage
        out["stageName"] = self.stage_names.get(codes.stage, "")
        return out

    @staticmethod
    def _finish_reason(choice: Choice) -> str:
        assert choice.finish is not None
        return FINISH_REASONS.get(choice.finish.reason, "stop")

    @staticmethod
    def _finish_json(finish: pb.FinishEvent) -> dict[str, Any]:
        out = message_to_dict(finish)
        out.pop("text", None)
        return out

    # -- chunks ------------------------------------------------------------------------------------------
    def opening(self) -> list[dict[str, Any]]:
        """The first chunk choice of each choice: the chat role, the echoed prompt, the featurewire header."""
        chat = self.request.kind == CHAT
        if not (chat or self.request.echo or self.request.steering.given):
            return []
        out = []
        for choice in self.choices:
            echo = "".join(choice.text) if self.request.echo else ""
            featurewire = {"seed": str(choice.seed)}
            if self.header is not None and self.header.stack:
                featurewire.update(stack=self.header.stack, stackDigest=self.header.stack_digest)
            out.append(self._chunk_choice(choice, echo, featurewire=featurewire, role=chat))
        return out

    def _chunk_choice(self, choice: Choice, text: str, *, logprob: tuple[str, float, int] | None = None,
                      finish: str | None = None, featurewire: dict[str, Any] | None = None,
                      role: bool = False) -> dict[str, Any]:
        if self.request.kind == CHAT:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if role else (
                {"content": text} if text else {})
            item: dict[str, Any] = {"index": choice.index, "delta": delta,
                                    "logprobs": {"content": [_chat_logprob(*logprob[:2])]} if logprob else None,
                                    "finish_reason": finish}
        else:
            item = {"index": choice.index, "text": text, "finish_reason": finish,
                    "logprobs": {"tokens": [logprob[0]], "token_logprobs": [logprob[1]], "top_logprobs": None,
                                 "text_offset": [logprob[2]]} if logprob else None}
        if self.request.steering.given:
            item["featurewire"] = {"branch": BRANCH_NAMES[choice.branch], **(featurewire or {})}
        return item

    def chunk(self, choices: list[dict[str, Any]], usage: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "object": self.chunk_object, "created": self.created,
                               "model": self.model, "choices": choices}
        if usage:
            out["usage"] = self.usage()
        return out

    # -- whole responses ---------------------------------------------------------------------------------
    def usage(self) -> dict[str, int]:
        prompt = sum(self.prompt_tokens)
        completion = sum(c.finish.generated_tokens for c in self.choices if c.finish is not None)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def response(self) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [self._whole(c) for c in self.choices], "usage": self.usage()}

    def _whole(self, choice: Choice) -> dict[str, Any]:
        text = "".join(choice.text)
        reason = self._finish_reason(choice) if choice.finish is not None else "stop"
        if self.request.kind == CHAT:
            logprobs = {"content": [_chat_logprob(t, lp) for t, lp in zip(choice.tokens, choice.logprobs,
                                                                          strict=True)]}
            item: dict[str, Any] = {"index": choice.index, "message": {"role": "assistant", "content": text},
                                    "logprobs": logprobs if self.request.logprobs else None, "finish_reason": reason}
        else:
            logprobs = {"tokens": choice.tokens, "token_logprobs": choice.logprobs, "top_logprobs": None,
                        "text_offset": choice.offsets}
            item = {"index": choice.index, "text": text, "logprobs": logprobs if self.request.logprobs else None,
                    "finish_reason": reason}
        if self.request.steering.given:
            featurewire: dict[str, Any] = {"branch": BRANCH_NAMES[choice.branch], "seed": str(choice.seed)}
            if choice.paired_with is not None:
                featurewire["pairedWith"] = choice.paired_with
            if self.header is not None and self.header.stack:
                featurewire.update(stack=self.header.stack, stackDigest=self.header.stack_digest)
            if choice.finish is not None:
                featurewire["finish"] = self._finish_json(choice.finish)
            if choice.conditions:
                featurewire["conditions"] = choice.conditions
            if self.request.steering.monitor:
                featurewire["tokens"] = choice.monitored
            item["featurewire"] = featurewire
        return item


def _chat_logprob(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8")), "top_logprobs": []}
