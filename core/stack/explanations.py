"""Scored explanation records in a stack's explanations file, next to the plain texts imported from JSONL.

The file (`explanations.<hash>.json`, recorded as `explanations` in stack.json) is `{"stages": {stage: {feature:
entry}}}`, where an entry is either a string (an imported one-line description, as every older file holds) or
an object written by `featurewire-train explain`:

    {"text": "...", "source": "llm", "explainer": MODEL, "prompt_version": "featurewire-explain-v1",
     "examples": SHA256 of the examples shown, "date": ISO-8601 UTC, "scorer": MODEL,
     "scores": {"detection": {"balanced_accuracy": float in [0, 1], "examples": N, "unparsed": U},
                "fuzzing": {...}}}

`core.stack.dashboards.parse_explanations` reads the texts of both forms, so servers and older readers keep
working; this module keeps the whole records for resuming and merging.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.stack.dashboards import EXPLANATIONS, MAX_EXPLANATION_CHARS, parse_explanations
from core.stack.manifest import StackError, attach_records, load_manifest


def read_records(stack_dir: str | Path) -> dict[str, dict[int, Any]]:
    """{stage: {feature: entry (a string or a record object)}} of the stack's explanations file; empty without one.
    The file is checked as the reader checks it (stages, widths, texts) before anything is returned."""
    root = Path(stack_dir)
    manifest, _ = load_manifest(root)
    record = manifest.get("explanations")
    if record is None:
        return {}
    data = (root / record["file"]).read_bytes()
    parse_explanations(data, {s["name"]: s["d_sae"] for s in manifest["stages"]})
    parsed = json.loads(data)
    return {stage: {int(f): entry for f, entry in table.items()} for stage, table in parsed["stages"].items()}


def check_record(entry: Mapping[str, Any]) -> None:
    """A scored record must carry its text, provenance and scores in range (what a reader may rely on)."""
    text = entry.get("text")
    if not isinstance(text, str) or not 0 < len(text) <= MAX_EXPLANATION_CHARS:
        raise StackError(f"an explanation record needs a text of 1..{MAX_EXPLANATION_CHARS} characters")
    for key in ("explainer", "prompt_version", "examples", "date"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise StackError(f"an explanation record needs {key!r} (a non-empty string)")
    for name, score in (entry.get("scores") or {}).items():
        value, count = score.get("balanced_accuracy"), score.get("examples")
        if not (isinstance(value, float | int) and 0 <= value <= 1 and type(count) is int and count > 0):
            raise StackError(f"score {name!r} must have balanced_accuracy in [0, 1] and examples > 0, got {score}")


def merge_records(stack_dir: str | Path, new: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> str:
    """Write the stack's explanations with `new` records replacing those of the same features (others kept), in
    one atomic manifest swap (core/stack/manifest.attach_records). Returns the new file's name."""
    for table in new.values():
        for entry in table.values():
            check_record(entry)
    merged = read_records(stack_dir)
    for stage, table in new.items():
        merged.setdefault(stage, {}).update({int(f): dict(entry) for f, entry in table.items()})
    stages = {stage: {str(f): entry for f, entry in sorted(table.items())} for stage, table in merged.items()}
    data = (json.dumps({"stages": stages}, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    manifest, _ = load_manifest(Path(stack_dir))
    count = sum(len(table) for table in parse_explanations(data, {s["name"]: s["d_sae"]
                                                                  for s in manifest["stages"]}).values())
    (name,) = attach_records(stack_dir, "explanations", ".json", {None: (data, {"count": count})})
    return name


__all__ = ["EXPLANATIONS", "check_record", "merge_records", "read_records"]
