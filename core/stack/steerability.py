"""Measured steerability stored in a stack: per stage, one JSON file of per-feature records.

Written by `featurewire-train steerability` (trainer/steerability/); a stage's `steerability` record in stack.json
names `stage_NN_<hookpoint>.steerability.<hash>.json` with file, sha256, bytes, `count` (features measured),
`steers` (how many of them steer) and `settings` (what they were measured with). The file is
`{"format": 1, "stage": NAME, "settings": {...}, "residual_norm": FLOAT, "features": {"<id>": RECORD}}`; a RECORD
holds `curve` (a list of points, one per op, unit and strength), `verdict` ({steers, best, ...}), `output_score`
and the rest documented in docs/stack-format.md. Stacks without it load and serve as before.

Torch-free on purpose, like core/stack/dashboards.py.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.stack.manifest import StackError, attach_records, load_manifest

FORMAT = 1
MAX_STEERABILITY_BYTES = 256 << 20
KIND = "steerability"


def check_steerability_entry(index: int, entry: Mapping[str, Any], files: Mapping[str, Any]) -> dict[str, Any] | None:
    """The stage's `steerability` record after checking its shape and that its file is listed; None without one."""
    record = entry.get(KIND)
    if record is None:
        return None
    where = f"stack.json: stages[{index}].{KIND}"
    if not isinstance(record, dict) or not isinstance(record.get("file"), str):
        raise StackError(f"{where} must be an object with a file")
    if record["file"] not in files:
        raise StackError(f"{where}: file {record['file']!r} is not listed in stack.json files")
    if type(record.get("count")) is not int or record["count"] < 0:
        raise StackError(f"{where}.count must be an integer >= 0")
    return record


def _check_record(where: str, record: Any) -> dict[str, Any]:
    if not isinstance(record, dict) or not isinstance(record.get("curve"), list):
        raise StackError(f"{where} must be an object with a curve list")
    for i, point in enumerate(record["curve"]):
        if not (isinstance(point, dict) and point.get("op") in ("add", "set") and point.get("unit") in ("max", "norm")
                and all(isinstance(point.get(k), int | float) and not isinstance(point.get(k), bool)
                        and math.isfinite(point[k]) for k in ("value", "expression", "fluency_cost"))):
            raise StackError(f"{where}.curve[{i}] needs op (add|set), unit (max|norm) and finite value, expression "
                             "and fluency_cost")
    verdict = record.get("verdict")
    if not (isinstance(verdict, dict) and isinstance(verdict.get("steers"), bool)
            and (verdict.get("best") is None or isinstance(verdict["best"], dict))):
        raise StackError(f"{where}.verdict must be an object with steers (bool) and best (object or null)")
    score = record.get("output_score")
    if score is not None and (isinstance(score, bool) or not isinstance(score, int | float)):
        raise StackError(f"{where}.output_score must be a number or null")
    return record


def parse_steerability(data: bytes, d_sae: int, where: str = "steerability file") -> dict[str, Any]:
    """The file's object, with `features` keyed by int feature ids in [0, d_sae), every record checked."""
    if len(data) > MAX_STEERABILITY_BYTES:
        raise StackError(f"{where} is larger than {MAX_STEERABILITY_BYTES >> 20} MiB")
    try:
        payload = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise StackError(f"{where} is not JSON: {exc}") from None
    if not (isinstance(payload, dict) and payload.get("format") == FORMAT
            and isinstance(payload.get("features"), dict)):
        raise StackError(f"{where} must be an object with format {FORMAT} and features")
    features = {}
    for key, record in payload["features"].items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < d_sae):
            raise StackError(f"{where}: feature {key!r} is not an id in [0, {d_sae})")
        features[int(key)] = _check_record(f"{where}: feature {key}", record)
    return {**payload, "features": features}


def dump_steerability(payload: Mapping[str, Any]) -> bytes:
    """The file `parse_steerability` reads back, features in id order."""
    features = {str(f): record for f, record in sorted(payload["features"].items())}
    return (json.dumps({**payload, "format": FORMAT, "features": features}, allow_nan=False) + "\n").encode("utf-8")


def read_steerability(root: Path, index: int, entry: Mapping[str, Any], files: Mapping[str, Any],
                      d_sae: int) -> dict[str, Any] | None:
    """A stage's stored steerability (re-hashed as read), or None when the stage has none."""
    record = check_steerability_entry(index, entry, files)
    if record is None:
        return None
    data = (root / record["file"]).read_bytes()
    if hashlib.sha256(data).hexdigest() != files[record["file"]]["sha256"]:
        raise StackError(f"stack file {record['file']!r} changed while the stack was being read")
    return parse_steerability(data, d_sae, f"stage {index}'s steerability file")


def load_stage_steerability(stack_dir: str | Path, index: int) -> dict[str, Any] | None:
    """Read one stage's steerability straight from a stack directory (for resuming a run)."""
    root = Path(stack_dir)
    manifest, _ = load_manifest(root)
    entry = manifest["stages"][index]
    return read_steerability(root, index, entry, manifest["files"], int(entry["d_sae"]))


def attach_steerability(stack_dir: str | Path, payloads: Mapping[int, Mapping[str, Any]]) -> list[str]:
    """Store {stage index: payload} (replacing what the stage had); each payload is checked as the reader will."""
    manifest, _ = load_manifest(Path(stack_dir))
    items = {}
    for index, payload in payloads.items():
        if not 0 <= index < len(manifest["stages"]):
            raise StackError(f"stage index {index} out of range: the stack has {len(manifest['stages'])} stages")
        data = dump_steerability(payload)
        parsed = parse_steerability(data, int(manifest["stages"][index]["d_sae"]))
        steers = sum(bool(r["verdict"]["steers"]) for r in parsed["features"].values())
        items[index] = (data, {"count": len(parsed["features"]), "steers": steers,
                               "settings": dict(payload.get("settings") or {})})
    return attach_records(stack_dir, KIND, ".json", items)
