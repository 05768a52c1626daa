"""Validation of SearchFeatures and ListFeatures requests, mixed into RequestValidator (contract/validation.py).

Same rules as the rest of the validator: every error names the field as the proto spells it (`text.span.end`,
`token.text`, `page_token`) and says what is allowed; NotFound for an unknown stack or stage, FailedPrecondition
when the stack lacks what the request needs (explanations, a dashboard). The text of a text search is tokenized
here, with character offsets when a span is given, so the engine receives the positions to rank.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from core.errors import FailedPrecondition, InvalidRequest
from core.stack.explanations import read_records
from service.engine.contract.feature_specs import (
    ExplanationSearch,
    FeatureSort,
    ListSpec,
    Page,
    Reduction,
    SearchSpec,
    TextSearch,
    TokenDirection,
    TokenSearch,
)
from service.engine.contract.inputs import MAX_QUERY_CHARS, InputIn, ListFeaturesIn, SearchIn, TextQueryIn, TokenQueryIn
from service.engine.contract.paging import PageSigner, canonical

if TYPE_CHECKING:
    from core.host.host_model import HostModel
    from core.stack.reader import LoadedStage
    from service.engine.contract.inputs import Limits
    from service.engine.stacks.served import ServedStack

WORD = re.compile(r"\w+")
MAX_TOKEN_CHARS = 256  # a token search's string: far longer than any one token
DASHBOARD_HINT = "compute them with `featurewire-train dashboards --stack DIR` and restart the server"


def query_words(text: str) -> tuple[str, ...]:
    """Lower-case words of a text, each once, in order (what explanation search matches)."""
    return tuple(dict.fromkeys(WORD.findall(text.lower())))


def special_ids(tokenizer) -> frozenset[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i in (tokenizer.bos_token_id, tokenizer.pad_token_id) if i is not None)
    return frozenset(ids)


class FeatureQueryValidation:
    """SearchFeatures / ListFeatures checks; the host class provides stack(), stage(), stages(), input_ids(), host,
    limits, vocab_size and pages."""

    host: HostModel
    limits: Limits
    vocab_size: int
    pages: PageSigner

    if TYPE_CHECKING:
        def stack(self, name: str, *, needed: bool = True, why: str = "this request") -> ServedStack | None: ...
        def stage(self, stack: ServedStack, name: str, field: str) -> int: ...
        def stages(self, stack: ServedStack, names: tuple[str, ...], field: str) -> tuple[int, ...]: ...
        def input_ids(self, item: InputIn | None, field: str, *, min_tokens: int = 1) -> tuple[int, ...]: ...

    def page(self, size: int, token: str, query: bytes) -> Page:
        """page_size 0 = the default, at most max_page_size; the token's offset, checked against `query`."""
        limit = self.limits.max_page_size
        if not 0 <= size <= limit:
            raise InvalidRequest(f"page_size {size} is out of range: 1..{limit} (Limits.max_page_size), or 0 for "
                                 f"{self.limits.default_page_size}")
        return Page(self.pages.offset(query, token), int(size) or self.limits.default_page_size, query)

    # ------------------------------------------------------------------------------------ SearchFeatures

    def search_features(self, item: SearchIn) -> SearchSpec:
        served = self.stack(item.stack, why="SearchFeatures")
        assert served is not None
        stages = self.stages(served, tuple(item.stages), "stages")
        given = [name for name, value in (("text", item.text), ("token", item.token),
                                           ("explanation", item.explanation)) if value is not None]
        if len(given) != 1:
            raise InvalidRequest("set exactly one query: text, token or explanation"
                                 + (f" (got {', '.join(given)})" if given else ""))
        if item.text is not None:
            query, key = self._text_query(item.text)
        elif item.token is not None:
            query, key = self._token_query(item.token)
        else:
            query, key = self._explanation_query(served, item.explanation or "")
        fields = canonical("SearchFeatures", served.name, served.digest, list(stages), *key)
        return SearchSpec(served.name, stages, query, self.page(item.page_size, item.page_token, fields))

    def _text_query(self, q: TextQueryIn) -> tuple[TextSearch, tuple]:
        add = True if q.add_special_tokens is None else bool(q.add_special_tokens)
        ids = self.input_ids(InputIn(text=q.text, add_special_tokens=add), "text")
        special = special_ids(self.host.tokenizer)
        if q.span is None:
            ranked = tuple(p for p, i in enumerate(ids) if i not in special)
            if not ranked:
                raise InvalidRequest("text.text has only special tokens; send text with at least one ordinary token")
        else:
            ranked = self._span_positions(q.text, add, ids, special, q.span.start, q.span.end)
        reduction = q.reduction or Reduction.MAX
        span = None if q.span is None else [q.span.start, q.span.end]
        return TextSearch(ids, ranked, reduction), ("text", q.text, span, str(reduction), add)

    def _span_positions(self, text: str, add: bool, ids: tuple[int, ...], special: frozenset[int], start: int,
                        end: int) -> tuple[int, ...]:
        """Positions of the non-special tokens overlapping characters [start, end)."""
        if not 0 <= start < end:
            raise InvalidRequest(f"text.span [{start}, {end}) is empty: end must be > start")
        if end > len(text):
            raise InvalidRequest(f"text.span.end {end} is past the end of the text ({len(text)} characters); the "
                                 f"span must lie in [0, {len(text)}]")
        tokenizer = self.host.tokenizer
        if not getattr(tokenizer, "is_fast", False):
            raise FailedPrecondition("text.span needs character offsets, which this model's tokenizer does not "
                                     "report; search the whole text instead")
        encoded = tokenizer(text, add_special_tokens=add, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
        if tuple(encoded["input_ids"]) != ids:  # pragma: no cover - the same call without offsets
            raise FailedPrecondition("the tokenizer's offsets disagree with its tokens; search the whole text")
        ranked = tuple(p for p, ((s, e), i) in enumerate(zip(offsets, ids, strict=True))
                       if i not in special and e > s and s < end and e > start)
        if not ranked:
            raise InvalidRequest(f"text.span [{start}, {end}) covers no token of the text; widen it")
        return ranked

    def _token_query(self, q: TokenQueryIn) -> tuple[TokenSearch, tuple]:
        if (q.text is None) == (q.id is None):
            raise InvalidRequest("token: set exactly one of token.text and token.id")
        if q.text is not None:
            if not 0 < len(q.text) <= MAX_TOKEN_CHARS:
                raise InvalidRequest(f"token.text has {len(q.text)} characters; it must be one token "
                                     f"(1..{MAX_TOKEN_CHARS} characters)")
            ids = self.host.tokenizer(q.text, add_special_tokens=False).input_ids
            if len(ids) != 1:
                pieces = [self.host.decode([i], skip_special_tokens=False) for i in ids[:8]]
                raise InvalidRequest(f"token.text {q.text!r} encodes to {len(ids)} tokens {pieces}; it must encode "
                                     "to exactly one token (or pass token.id)")
            token_id = int(ids[0])
        else:
            token_id = int(q.id or 0)
            if not 0 <= token_id < self.vocab_size:
                raise InvalidRequest(f"token.id {token_id} is out of range: token ids are 0..{self.vocab_size - 1} "
                                     f"(ModelInfo.vocab_size {self.vocab_size})")
        direction = q.direction or TokenDirection.PROMOTES
        return TokenSearch(token_id, direction), ("token", token_id, str(direction))

    def _explanation_query(self, served: ServedStack, text: str) -> tuple[ExplanationSearch, tuple]:
        if not 0 < len(text) <= MAX_QUERY_CHARS:
            raise InvalidRequest(f"explanation has {len(text)} characters; send 1..{MAX_QUERY_CHARS} with at least "
                                 "one word")
        words = query_words(text)
        if not words:
            raise InvalidRequest(f"explanation {text[:40]!r} has no words to match; send at least one word")
        if not served.loaded.explanations and not any(has_labels(stage) for stage in served.loaded.stages):
            raise FailedPrecondition(f"stack {served.name!r} has neither explanations nor token labels to search; "
                                     "compute labelled dashboards with `featurewire-train dashboards --stack DIR` "
                                     "or attach explanations with `featurewire-train explanations --stack DIR "
                                     "--from FILE.jsonl`, and restart the server")
        return ExplanationSearch(words), ("explanation", list(words))

    # -------------------------------------------------------------------------------------- ListFeatures

    def list_features(self, item: ListFeaturesIn) -> ListSpec:
        served = self.stack(item.stack, why="ListFeatures")
        assert served is not None
        index = self.stage(served, item.stage, "stage")
        if served.loaded.stages[index].dashboard is None:
            raise FailedPrecondition(f"stage {item.stage!r} of stack {served.name!r} has no feature dashboards; "
                                     + DASHBOARD_HINT)
        low = _density(item.min_density, 0.0, "min_density")
        high = _density(item.max_density, 1.0, "max_density")
        if low > high:
            raise InvalidRequest(f"min_density {low} is above max_density {high}; the range must have min <= max")
        sort = item.sort or FeatureSort.DENSITY
        if sort is FeatureSort.LABEL_F1 and not has_labels(served.loaded.stages[index]):
            raise FailedPrecondition(f"sort LABEL_F1: the dashboard of stage {item.stage!r} of stack {served.name!r} "
                                     "was written without token labels; sort by DENSITY or MAX, or recompute it: "
                                     + DASHBOARD_HINT)
        if sort is FeatureSort.EXPLANATION_SCORE and not detection_scores(served).get(item.stage):
            raise FailedPrecondition(f"sort EXPLANATION_SCORE: stage {item.stage!r} of stack {served.name!r} has no "
                                     "scored explanations; write them with `featurewire-train explain --stack DIR "
                                     "--endpoint URL --model NAME` and restart the server, or sort by DENSITY or MAX")
        steering = sort in (FeatureSort.STEERING, FeatureSort.OUTPUT_SCORE) or item.steerable_only
        if steering and not served.loaded.stages[index].steerability:
            why = f"sort {sort.name}" if sort in (FeatureSort.STEERING, FeatureSort.OUTPUT_SCORE) else "steerable_only"
            raise FailedPrecondition(f"{why}: stage {item.stage!r} of stack {served.name!r} has no steerability "
                                     "records; "
                                     "measure them with `featurewire-train steerability --stack DIR --stage NAME "
                                     "--sample N` and restart the server, or sort by DENSITY or MAX")
        fields = canonical("ListFeatures", served.name, served.digest, index, low, high, str(sort),
                           bool(item.descending), bool(item.steerable_only))
        return ListSpec(served.name, index, low, high, sort, bool(item.descending),
                        self.page(item.page_size, item.page_token, fields), bool(item.steerable_only))


_DETECTION: dict[tuple[str, str], dict[str, dict[int, float]]] = {}
"""(stack name, digest) -> stage name -> {feature: its explanation's detection balanced accuracy}, for scored
explanations only (`featurewire-train explain`); read once per stack."""


def detection_scores(served: ServedStack) -> dict[str, dict[int, float]]:
    """Every scored explanation's detection balanced accuracy, by stage name and feature."""
    key = (served.name, served.digest)
    if key not in _DETECTION:
        records = read_records(served.path) if served.loaded.explanations else {}
        _DETECTION[key] = {stage: {f: float(e["scores"]["detection"]["balanced_accuracy"]) for f, e in table.items()
                                   if isinstance(e, dict) and "detection" in (e.get("scores") or {})}
                           for stage, table in records.items()}
    return _DETECTION[key]


def has_labels(stage: LoadedStage) -> bool:
    """Whether the stage's dashboard carries token labels (dashboards written before labels do not)."""
    return stage.dashboard is not None and "label_f1" in stage.dashboard


def _density(value: float | None, default: float, field: str) -> float:
    if value is None:
        return default
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise InvalidRequest(f"{field} {value} is out of range: a density in [0, 1]")
    return float(value)
