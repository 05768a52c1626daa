"""The torch-free half of the stack format: the manifest, file names, hashes and the ONNX records.

Why a separate module: the activation-only server (`featurewire-serve serve --no-model`) reads a stack's
manifest and ONNX graphs without importing torch, so everything here uses only the standard library.
`core.stack.reader` and `core.stack.writer` build on it (they add the safetensors checks and the SAEs).

A stage may carry an optional `onnx` record, written by `featurewire-train export-onnx`:

    {"file": "stage_00_blocks.3.hook_resid_post.3f2a….onnx", "sha256": …, "bytes": …,
     "codes": "top_k" | "full", "opset": 17, "ir_version": 8, "inputs": [...], "outputs": [...],
     "source": {"<stage weights file>": "<its sha256>", "<affine file>": …}, "parity": {...}}

`source` names the weights the graph was exported from, so a graph left behind by a hand-edited manifest
is refused instead of silently serving other weights. ONNX file names carry a content hash: attaching new
graphs writes new files, swaps the manifest atomically and only then deletes the old files, so a reader
never sees a manifest whose hashes do not match its files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "stack.json"
MAX_MANIFEST_BYTES = 16 << 20
ALLOWED_SUFFIXES = (".safetensors", ".json", ".onnx")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib")
SUPPORTED_FORMAT_VERSIONS = (1,)
ONNX_CODES = ("top_k", "full")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")
MAX_DIMENSION = 2**31 - 1
"""Largest d_in or d_sae a stack may declare: widths and feature ids travel as uint32 in the API, and a
larger declared shape is refused before anything is built (torch overflows building 2**62 features)."""


class StackError(ValueError):
    """A stack that cannot be written or must not be loaded; the message says what and why."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def safe_name(name: str) -> bool:
    return bool(_SAFE_NAME.match(name))


def write_atomic(path: Path, data: bytes) -> None:
    """Bytes to a temporary name, fsync, rename: readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def dump_manifest(path: Path, manifest: dict[str, Any]) -> None:
    try:
        text = json.dumps(manifest, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise StackError(f"stack.json: training, metrics and extras must be plain JSON: {exc}") from None
    write_atomic(path, text.encode("utf-8"))


def checked_path(root: Path, name: Any, *, manifest: bool = False) -> Path:
    """A listed file must be a plain file name directly inside the stack directory, of an allowed kind."""
    if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith(".") or not safe_name(name):
        raise StackError(f"refusing stack file {name!r}: only plain file names inside the stack directory are allowed")
    suffix = Path(name).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise StackError(f"refusing stack file {name!r}: pickle-based formats are never loaded; use safetensors")
    if suffix not in ALLOWED_SUFFIXES or (name == MANIFEST) != manifest:
        raise StackError(f"refusing stack file {name!r}: only safetensors and JSON data files (and ONNX graphs) "
                         "may be listed")
    path = root / name
    if path.is_symlink() and root.resolve() not in path.resolve().parents:
        raise StackError(f"refusing stack file {name!r}: it is a symlink pointing outside the stack directory")
    if not path.is_file():
        raise StackError(f"stack file {name!r} is missing from {root}")
    return path


def load_manifest(stack_dir: Path) -> tuple[dict[str, Any], str]:
    """The parsed, shape-checked manifest and the sha256 of the bytes that were parsed."""
    if not stack_dir.is_dir():
        raise StackError(f"{stack_dir} is not a directory")
    path = checked_path(stack_dir, MANIFEST, manifest=True)
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise StackError(f"{path} is larger than {MAX_MANIFEST_BYTES >> 20} MiB; refusing to parse it")
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise StackError(f"{path} is not valid JSON: {exc!s:.200}") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if type(version) is not int or version not in SUPPORTED_FORMAT_VERSIONS:
        readable = ", ".join(map(str, SUPPORTED_FORMAT_VERSIONS))
        raise StackError(f"stack format_version {version!r} is not supported (this featurewire reads version "
                         f"{readable}); upgrade featurewire or re-export the stack")
    stages, files = manifest.get("stages"), manifest.get("files")
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise StackError("stack.json: stages must be a non-empty list of objects")
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise StackError("stack.json: files must map file names to {sha256, bytes}")
    return manifest, hashlib.sha256(raw).hexdigest()


def verify_files(root: Path, files: Mapping[str, Any]) -> None:
    """Names and sizes of every listed file first (cheap), then their sha256."""
    paths = {}
    for name, record in files.items():
        paths[name] = path = checked_path(root, name)
        if type(record.get("bytes")) is not int or not isinstance(record.get("sha256"), str):
            raise StackError(f"stack.json: files[{name!r}] needs an integer bytes and a sha256 string")
        if (size := path.stat().st_size) != record["bytes"]:
            raise StackError(f"stack file {name!r} has {size} bytes, stack.json says {record['bytes']}")
    for name, path in paths.items():
        if file_sha256(path) != files[name]["sha256"]:
            raise StackError(f"stack file {name!r} is corrupt: its sha256 does not match stack.json")


# ----------------------------------------------------------------------------------------- ONNX records


def stage_sources(entry: Mapping[str, Any], files: Mapping[str, Any]) -> dict[str, str]:
    """The weight files a stage's graph is computed from, with their sha256: {file: sha256}."""
    records = (entry.get("residual"), entry.get("extra_tensors"), entry.get("error_predictor"))
    names = [entry.get("file"), *(r.get("file") for r in records if isinstance(r, dict))]
    return {n: files[n]["sha256"] for n in names if isinstance(n, str) and isinstance(files.get(n), dict)}


def check_onnx_entry(index: int, entry: Mapping[str, Any], files: Mapping[str, Any]) -> dict[str, Any] | None:
    """The stage's ONNX record after checking its shape, that its file is listed, and that it was exported
    from the weights the stage has now; None when the stage has no graph."""
    record = entry.get("onnx")
    if record is None:
        return None
    where = f"stack.json: stages[{index}].onnx"
    if not isinstance(record, dict) or not isinstance(record.get("file"), str) or not record["file"].endswith(".onnx"):
        raise StackError(f"{where} must be an object whose file is a .onnx file")
    if record["file"] not in files:
        raise StackError(f"{where}: file {record['file']!r} is not listed in stack.json files")
    if record.get("codes") not in ONNX_CODES:
        raise StackError(f"{where}.codes must be one of {', '.join(ONNX_CODES)}, got {record.get('codes')!r}")
    for key in ("inputs", "outputs"):
        if not isinstance(record.get(key), list) or not all(isinstance(n, str) for n in record[key]):
            raise StackError(f"{where}.{key} must be a list of names")
    if record.get("source") != stage_sources(entry, files):
        raise StackError(f"stage {index}: its ONNX graph {record['file']!r} was exported from other weights than the "
                         "stage has now; run `featurewire-train export-onnx` again")
    return record


def content_file_name(index: int | None, hookpoint: str, kind: str, data: bytes, suffix: str) -> str:
    """`stage_00_<hookpoint>.<kind>.<12 hex of sha256><suffix>` (or `<kind>.<hash><suffix>` for a stack-level
    file): new content, new name (see the module docstring). ONNX graphs keep their historical
    `stage_00_<hookpoint>.<hash>.onnx`."""
    digest = hashlib.sha256(data).hexdigest()[:12]
    stem = kind if index is None else f"stage_{index:02d}_{hookpoint}" + ("" if kind == "onnx" else f".{kind}")
    return f"{stem}.{digest}{suffix}"


def check_meta_entry(index: int, entry: Mapping[str, Any], files: Mapping[str, Any]) -> dict[str, Any] | None:
    """The stage's `meta_sae` record (a meta-SAE over its decoder rows, trainer/training/meta_sae.py) after checking
    its shape and that its file is listed; None when the stage has none."""
    record = entry.get("meta_sae")
    if record is None:
        return None
    where = f"stack.json: stages[{index}].meta_sae"
    if not isinstance(record, dict) or not isinstance(record.get("file"), str):
        raise StackError(f"{where} must be an object with a file")
    if record["file"] not in files:
        raise StackError(f"{where}: file {record['file']!r} is not listed in stack.json files")
    for key in ("width", "k"):
        if type(record.get(key)) is not int or record[key] < 1:
            raise StackError(f"{where}.{key} must be an integer >= 1")
    if not isinstance(record.get("sae_config"), dict) or not isinstance(record.get("metrics", {}), dict):
        raise StackError(f"{where} needs an sae_config object (and metrics, if any, must be an object)")
    return record


RecordFields = Mapping[str, Any] | Callable[[dict[str, Any], dict[str, Any]], Mapping[str, Any]]


def attach_records(stack_dir: str | Path, kind: str, suffix: str,
                   items: Mapping[int | None, tuple[bytes, RecordFields]]) -> list[str]:
    """Write files next to a stack and record them under `kind` in their stage's entry (index) or in the manifest
    itself (None): {index: (file bytes, record fields, or a function of (entry, files) giving them)}.

    Each record gets file, sha256 and bytes added. New files are written first, then the manifest is swapped
    atomically, and only then are the files they replace deleted, so a reader never sees a manifest whose hashes
    do not match its files. Returns the new file names.
    """
    root = Path(stack_dir)
    manifest, _ = load_manifest(root)
    stages, files = manifest["stages"], manifest["files"]
    written, replaced = [], []
    for index, (data, fields) in sorted(items.items(), key=lambda item: -1 if item[0] is None else item[0]):
        if index is not None and not 0 <= index < len(stages):
            raise StackError(f"stage index {index} out of range: the stack has {len(stages)} stages")
        entry = manifest if index is None else stages[index]
        name = content_file_name(index, str(entry.get("hookpoint")), kind, data, suffix)
        if not safe_name(name):
            raise StackError(f"stage {index}: cannot name its {kind} file after hookpoint {entry.get('hookpoint')!r}")
        write_atomic(root / name, data)
        written.append(name)
        old = entry.get(kind)
        if isinstance(old, dict) and isinstance(old.get("file"), str) and old["file"] != name:
            replaced.append(old["file"])
            files.pop(old["file"], None)
        sha = hashlib.sha256(data).hexdigest()
        extra = fields(entry, files) if callable(fields) else fields
        entry[kind] = {"file": name, "sha256": sha, "bytes": len(data), **extra}
        files[name] = {"sha256": sha, "bytes": len(data)}
    dump_manifest(root / MANIFEST, manifest)
    for name in replaced:
        if name.endswith(suffix) and safe_name(name):
            (root / name).unlink(missing_ok=True)
    return written


def attach_onnx(stack_dir: str | Path, graphs: Mapping[int, tuple[bytes, Mapping[str, Any]]]) -> list[str]:
    """Write ONNX graphs next to a stack and list them: {stage index: (model bytes, record fields)}.

    The record fields (codes, opset, inputs, outputs, parity, ...) are stored in the stage's `onnx` record
    with file, sha256, bytes and source added. Returns the new file names.
    """
    def record(fields: Mapping[str, Any]) -> RecordFields:
        return lambda entry, files: {**fields, "source": stage_sources(entry, files)}

    items = {index: (data, record(fields)) for index, (data, fields) in graphs.items()}
    return attach_records(stack_dir, "onnx", ".onnx", items)


# ------------------------------------------------------------------------------------- torch-free summary


@dataclass(frozen=True)
class StageSummary:
    """What a server without torch knows about a stage: identity, widths, records, its ONNX graph."""

    index: int
    name: str
    hookpoint: str
    architecture: str
    d_in: int
    d_sae: int
    signed: bool
    input_scale: float
    residual_of: int | None
    metrics: dict[str, Any]
    records: frozenset[str]  # keys of extras and extra tensors (e.g. "density", "top_examples")
    onnx: dict[str, Any] | None


@dataclass(frozen=True)
class StackSummary:
    path: Path
    name: str
    created_by: str
    host_model: str
    digest: str  # sha256 of stack.json, as core.stack.writer.stack_digest
    stages: tuple[StageSummary, ...]


def check_dimensions(index: int, entry: Mapping[str, Any]) -> None:
    """d_in and d_sae (already known to be ints) within 1..MAX_DIMENSION."""
    for key in ("d_in", "d_sae"):
        if not 1 <= entry[key] <= MAX_DIMENSION:
            raise StackError(f"stack.json: stages[{index}].{key} {entry[key]} is out of range: 1..{MAX_DIMENSION}")


def _stage_summary(index: int, entry: Mapping[str, Any], files: Mapping[str, Any]) -> StageSummary:
    kinds = {"name": str, "hookpoint": str, "architecture": str, "d_in": int, "d_sae": int, "input_scale": (int, float)}
    for key, kind in kinds.items():
        if not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
            raise StackError(f"stack.json: stages[{index}].{key} is missing or has the wrong type")
    scale = entry["input_scale"]
    check_dimensions(index, entry)
    if not (math.isfinite(scale) and scale > 0):
        raise StackError(f"stack.json: stages[{index}] needs a finite input_scale > 0")
    residual = entry.get("residual")
    source = residual.get("from_stage") if isinstance(residual, dict) else None
    if residual is not None and not (type(source) is int and 0 <= source < index):
        raise StackError(f"stack.json: stages[{index}].residual.from_stage must name an earlier stage")
    extra = entry.get("extra_tensors") if isinstance(entry.get("extra_tensors"), dict) else {}
    records = set(entry.get("extras") or {}) | set(extra.get("keys") or {})
    metrics = entry.get("metrics") if isinstance(entry.get("metrics"), dict) else {}
    return StageSummary(index, entry["name"], entry["hookpoint"], entry["architecture"], entry["d_in"],
                        entry["d_sae"], bool(entry.get("signed")), float(entry["input_scale"]), source, dict(metrics),
                        frozenset(records), check_onnx_entry(index, entry, files))


def read_summary(stack_dir: str | Path) -> StackSummary:
    """Verify a stack directory without torch (manifest, names, sizes and sha256 of every listed file, ONNX
    records) and summarise it. The safetensors headers are not parsed: ONNX serving never reads them."""
    root = Path(stack_dir)
    manifest, digest = load_manifest(root)
    files = manifest["files"]
    stages = tuple(_stage_summary(i, entry, files) for i, entry in enumerate(manifest["stages"]))
    if len({s.name for s in stages}) != len(stages):
        raise StackError("stack.json: stage names must be unique")
    name, host = manifest.get("name"), manifest.get("host_model")
    if not isinstance(name, str) or not isinstance(host, dict):
        raise StackError("stack.json: name must be a string and host_model an object")
    verify_files(root, files)
    return StackSummary(root, name, str(manifest.get("created_by", "")), str(host.get("name", "")), digest, stages)


def check_residual_hookpoints(entries: list[dict[str, Any]]) -> None:
    """A residual stage must read a different hookpoint than the stage it is the residual of."""
    for entry in entries:
        if residual := entry.get("residual"):
            source = entries[residual["from_stage"]]
            if source["hookpoint"] == entry["hookpoint"]:
                raise StackError(f"stage {entry['index']}: a residual stage must read a different hookpoint")
