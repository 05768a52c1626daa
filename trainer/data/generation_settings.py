"""Settings of the generated corpus (text sampled from the host model) and its shipped openings.

Kept free of torch so that configs and the `corpus` command validate them without loading a model. Sampling
is plain ancestral sampling with temperature and nucleus (top-p) truncation (Holtzman et al. 2020, "The
Curious Case of Neural Text Degeneration"): temperature 1 and top-p 0.95 stay close to the model's own
distribution while cutting the long tail of unlikely tokens that derails small models.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

SHIPPED_OPENINGS = "openings.json"
"""Package data of trainer.data: a few hundred short openings by category (everyday, narrative, dialogue,
news-like, science, instructions, essays, letters, history, lists, other languages, code), written for
featurewire."""

MAX_TOKENS = 50_000_000
MAX_NEW_TOKENS = 2048
MAX_BATCH_SIZE = 512
MAX_TEMPERATURE = 2.0


@dataclass(frozen=True)
class GenerationSettings:
    """How the generated corpus is sampled and filtered. Every field is part of its cache key."""

    tokens: int = 150_000
    """Generated tokens to keep (after filtering); sampling stops after the batch that reaches it."""
    max_new_tokens: int = 120
    """Tokens sampled per document after its opening (the opening plus these fit one 128-token window)."""
    min_new_tokens: int = 24
    """Samples that end (EOS) before this many new tokens are dropped as too short."""
    temperature: float = 1.0
    top_p: float = 0.95
    batch_size: int = 32
    """Sequences sampled together (the cost per token falls with it up to a point; see docs/operations.md)."""
    bos_share: float = 0.25
    """Share of samples that start from BOS alone; the others start from a shipped (or given) opening."""
    seed: int = 0
    openings: str = ""
    """A JSON openings file (same layout as the shipped one); empty: the shipped list."""
    max_repeat_share: float = 0.3
    """Samples in which more than this share of 4-grams repeat an earlier 4-gram are dropped (loops)."""
    min_distinct_share: float = 0.3
    """Samples with fewer distinct tokens than this share of their tokens are dropped (stuck on a few tokens)."""

    def __post_init__(self) -> None:
        _integer("tokens", self.tokens, 1, MAX_TOKENS)
        _integer("max_new_tokens", self.max_new_tokens, 8, MAX_NEW_TOKENS)
        _integer("min_new_tokens", self.min_new_tokens, 1, self.max_new_tokens)
        _integer("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        _integer("seed", self.seed, 0, 2**63 - 1)
        _number("temperature", self.temperature, 0.0, MAX_TEMPERATURE, low_open=True)
        _number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _number("bos_share", self.bos_share, 0.0, 1.0)
        _number("max_repeat_share", self.max_repeat_share, 0.0, 1.0, low_open=True)
        _number("min_distinct_share", self.min_distinct_share, 0.0, 1.0)
        if not isinstance(self.openings, str):
            raise ValueError(f"generation.openings must be a path string ('' for the shipped list), "
                             f"got {self.openings!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GenerationSettings:
        """From a config table; unknown keys are refused with the allowed ones."""
        allowed = {f.name for f in fields(cls)}
        unknown = set(values) - allowed
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)} in [corpus.generation]; allowed: "
                             f"{', '.join(sorted(allowed))}")
        return cls(**values)


def _integer(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"generation.{name} must be an integer in [{low}, {high}], got {value!r}")


def _number(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (low < value if low_open else low <= value) or value > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"generation.{name} must be a number in {bracket}{low:g}, {high:g}], got {value!r}")


@dataclass(frozen=True)
class Openings:
    """Prompts for the generated corpus, flattened in file order, with where they came from."""

    texts: tuple[str, ...]
    categories: tuple[str, ...]  # one per text
    origin: str  # 'shipped' or the file path
    sha256: str  # of the file's bytes: part of the cache key


def load_openings(path: str = "") -> Openings:
    """The shipped openings (`path` empty) or a JSON file {"openings": {category: [text, ...]}}.

    Errors name the file and the expected layout.
    """
    layout = 'a JSON object {"openings": {"<category>": ["<opening text>", ...], ...}}'
    if path:
        file = Path(path).expanduser()
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise ValueError(f"openings file {path!r} cannot be read ({exc.strerror or exc}); pass a readable "
                             f"file holding {layout}, or '' for the shipped list") from None
        origin = str(file)
    else:
        data = resources.files("trainer.data").joinpath(SHIPPED_OPENINGS).read_bytes()
        origin = "shipped"
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"openings file {origin!r} is not UTF-8 JSON ({exc}); expected {layout}") from None
    groups = parsed.get("openings") if isinstance(parsed, dict) else None
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"openings file {origin!r} has no non-empty 'openings' object; expected {layout}")
    texts: list[str] = []
    categories: list[str] = []
    for category, items in groups.items():
        if not isinstance(items, list) or not all(isinstance(t, str) and t.strip() for t in items):
            raise ValueError(f"openings file {origin!r}: category {category!r} must be a list of non-empty "
                             f"strings; expected {layout}")
        texts += items
        categories += [category] * len(items)
    if not texts:
        raise ValueError(f"openings file {origin!r} lists no openings; expected {layout}")
    return Openings(tuple(texts), tuple(categories), origin, hashlib.sha256(data).hexdigest())
