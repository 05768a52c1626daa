"""Corpus mixing specs: `generated:0.7,pydocs:0.3`, `default`, `my_texts/`, `generated:2,notes.jsonl:1`.

A spec is a comma-separated list of SOURCE[:WEIGHT]. A source is a named one (NAMED_SOURCES) or a path (a
text file, a .jsonl file or a directory, as `load_corpus` reads them). Weights are relative shares of the
mixed corpus's characters (a proxy for tokens that needs no tokenizer); they default to 1. A single source
keeps all of its documents, exactly as before mixing existed. With several, the mix is as large as the
scarcest source allows at its share: each source contributes weight × budget characters, taking its
documents in a seeded order of (seed, document id) hashes, so documents added to a source can displace
others but never bring back one that was left out, and a document's split (`split_documents`, by its id)
is untouched by mixing.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar


class _Document(Protocol):  # trainer.data.corpus.Document (not imported: corpus imports this module)
    @property
    def doc_id(self) -> str: ...
    @property
    def text(self) -> str: ...


Doc = TypeVar("Doc", bound=_Document)

DEFAULT = "default"
PYDOCS = "pydocs"
GENERATED = "generated"
NAMED_SOURCES = {
    DEFAULT: "text that ships with Python (pydoc topics and standard-library docstrings); same as pydocs",
    PYDOCS: "text that ships with Python (pydoc topics and standard-library docstrings)",
    GENERATED: "text sampled from the host model itself, cached (settings in [corpus.generation])",
}
SPEC_HELP = (
    "comma-separated SOURCE[:WEIGHT] list; SOURCE is 'pydocs' (or 'default': text shipped with Python), "
    "'generated' (text sampled from the host model, cached), a text file, a .jsonl file or a directory of "
    ".txt/.md/.jsonl files; WEIGHT (default 1) is the source's relative share of characters, "
    "e.g. 'generated:0.7,pydocs:0.3'"
)


@dataclass(frozen=True)
class MixPart:
    source: str  # a NAMED_SOURCES key or a path
    weight: float


def parse_mix(spec: str) -> list[MixPart]:
    """Parse a spec; errors say what is wrong and what is allowed. Paths must not contain commas."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"corpus spec is empty; expected {SPEC_HELP}")
    parts: list[MixPart] = []
    for item in (i.strip() for i in spec.split(",")):
        if not item:
            raise ValueError(f"corpus spec {spec!r} has an empty item; expected {SPEC_HELP}")
        source, weight = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and head:
            try:
                weight = float(tail)
            except ValueError:
                if head in NAMED_SOURCES:
                    raise ValueError(f"corpus spec item {item!r}: weight {tail!r} is not a number") from None
            else:
                source = head
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"corpus spec item {item!r}: weight must be a finite number >= 0, got {weight:g}")
        parts.append(MixPart(source, weight))
    names = [p.source for p in parts]
    if len(set(names)) != len(names) or {DEFAULT, PYDOCS} <= set(names):
        raise ValueError(f"corpus spec {spec!r} names a source twice ('default' and 'pydocs' are one source)")
    if not any(p.weight > 0 for p in parts):
        raise ValueError(f"corpus spec {spec!r}: all weights are zero; give at least one source a weight > 0")
    return parts


def uses_generated(spec: str) -> bool:
    """Whether the spec samples from the host model (False for a spec that does not parse)."""
    try:
        return any(p.source == GENERATED and p.weight > 0 for p in parse_mix(spec))
    except ValueError:
        return False


def _rank(seed: int, doc_id: str) -> bytes:
    return hashlib.sha256(f"mix\x00{seed}\x00{doc_id}".encode()).digest()


def mix_documents(parts: Sequence[MixPart], documents: Mapping[str, Sequence[Doc]],
                  seed: int = 0) -> tuple[list[Doc], dict[str, dict[str, float]]]:
    """The mixed document list and, per source, its weight, documents and characters in the mix.

    One source: all of its documents. Several: see the module docstring. Zero-weight sources contribute
    nothing. Order: sources in spec order, each source's documents in their original order.
    """
    active = [p for p in parts if p.weight > 0]
    for part in active:
        if not documents[part.source]:
            raise ValueError(f"corpus source {part.source!r} has no documents, so it cannot make up "
                             f"{part.weight:g} of the mix; drop it or give it weight 0")
    chars = {p.source: sum(len(d.text) for d in documents[p.source]) for p in active}
    total_weight = sum(p.weight for p in active)
    if len(active) == 1:
        chosen = {active[0].source: list(documents[active[0].source])}
    else:
        budget = min(chars[p.source] * total_weight / p.weight for p in active)  # characters of the whole mix
        chosen = {p.source: _take(documents[p.source], budget * p.weight / total_weight, seed) for p in active}
    mixed = [d for p in active for d in chosen[p.source]]
    ids = [d.doc_id for d in mixed]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"document id {duplicate!r} occurs in two sources of the mix; ids decide the splits, "
                         f"so rename one of the files")
    report = {p.source: {"weight": p.weight, "share_requested": p.weight / total_weight,
                         "documents": len(chosen.get(p.source, [])),
                         "characters": sum(len(d.text) for d in chosen.get(p.source, []))} for p in parts}
    mixed_chars = sum(r["characters"] for r in report.values()) or 1
    for entry in report.values():
        entry["share_actual"] = entry["characters"] / mixed_chars
    return mixed, report


def _take(docs: Sequence[Doc], characters: float, seed: int) -> list[Doc]:
    """Documents in seeded id-hash order, each taken when at least half of it fits in what is left of
    `characters` (so one long document cannot blow a small share), returned in their original order."""
    keep: set[int] = set()
    taken = 0
    for index in sorted(range(len(docs)), key=lambda i: _rank(seed, docs[i].doc_id)):
        size = len(docs[index].text)
        if taken + size / 2 <= characters:
            keep.add(index)
            taken += size
    return [d for i, d in enumerate(docs) if i in keep]


def load_mix(spec: str, load_source: Callable[[str], list[Doc]],
             seed: int = 0) -> tuple[list[Doc], dict[str, dict[str, float]]]:
    """Parse `spec`, load each source with a positive weight through `load_source`, and mix them. A single
    source comes back as `load_source` gave it."""
    parts = parse_mix(spec)
    documents = {p.source: load_source(p.source) for p in parts if p.weight > 0}
    if len(documents) == 1 and len(parts) == 1:
        only = documents[parts[0].source]
        return only, {parts[0].source: {"weight": parts[0].weight, "share_requested": 1.0, "share_actual": 1.0,
                                        "documents": len(only), "characters": sum(len(d.text) for d in only)}}
    return mix_documents(parts, documents, seed)
