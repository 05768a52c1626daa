"""Incremental detokenisation and stop strings for one generated branch (`TextStream`).

Kept apart from the generation loop because it is pure text handling: it needs a tokenizer and nothing of
torch, and every face (gRPC, the JSON gateway, the OpenAI-compatible API) streams the deltas it releases.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

CONTEXT_TOKENS = 4
"""Prompt tokens decoded in front of the generated ones, so tokenizers that drop a leading space at the
start of a text (SentencePiece) render the first generated token as it reads after the prompt."""


class TextStream:
    """Incremental detokenisation of one branch: text deltas that never end inside a UTF-8 character
    (a trailing U+FFFD is held back) nor release text that may be the start of a stop string, so the
    deltas always concatenate to the branch's final text (cut before the stop string)."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.context = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix = self._decode(self.context)
        self.ids: list[int] = []
        self.text = ""  # all generated text decoded so far; may end inside a character
        self.emitted = ""  # what the deltas released; the branch's text at the end
        self.final: str | None = None  # the text cut before the first stop string, once one appeared

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        """Append a token; returns the stop string that now appears in the text ("" when none)."""
        self.ids.append(token)
        full = self._decode(self.context + self.ids)
        self.text = full[len(self.prefix):] if full.startswith(self.prefix) else self._decode(self.ids)
        if self.final is not None:
            return ""
        hits = [(index, stop) for stop in self.stops if (index := self.text.find(stop)) >= 0]
        if not hits:
            return ""
        index, stop = min(hits, key=lambda hit: hit[0])
        self.final = self.text[:index]
        return stop

    def _held_back(self) -> int:
        """Characters at the end of the text that cannot be released yet."""
        complete = self.text.rstrip("\ufffd")
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(complete)), hold, -1):
                if complete.endswith(stop[:k]):
                    hold = k
                    break
        return len(self.text) - len(complete) + hold

    def release(self, *, final: bool) -> str:
        """The text delta to send now; `final` releases everything (the branch ends with this token)."""
        if self.final is not None:
            target = self.final
        else:
            target = self.text if final else self.text[: len(self.text) - self._held_back()]
        if not target.startswith(self.emitted):  # a decoder that rewrote earlier text: keep what was sent
            return ""
        delta = target[len(self.emitted):]
        self.emitted = target
        return delta
