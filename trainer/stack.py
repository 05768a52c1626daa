"""The SAE stack directory, the contract between the trainer and the service: write, read, verify.

    stack.json                                         manifest (format_version 1), written last
    stage_00_blocks.3.hook_resid_post.safetensors      stage 0's SAE state_dict, contiguous fp32
    stage_00_blocks.3.hook_resid_post.extra.safetensors  optional per-stage extra tensors
    stage_01_blocks.6.hook_resid_post.affine.safetensors  a residual (ReSAE) stage's predictor A, c
    stage_01_blocks.6.hook_resid_post.error.safetensors   optional error-norm probes (trainer/stack_error.py)
    stage_00_blocks.3.hook_resid_post.meta.safetensors    optional meta-SAE over the decoder rows

The manifest holds `name`, `created_by`, `host_model` (a HostModelIdentity), `stages` in forward order
(index, name, hookpoint, architecture, d_in, d_sae, signed, input_scale, sae_config, file/sha256/bytes,
optional extra_tensors {file, sha256, bytes, keys}, optional residual {from_stage, file, sha256, bytes,
alpha, r2_held_out, residual_scale, r2_by_alpha} for a ReSAE stage that reads the residual of the stage
`from_stage`, optional error_predictor {file, sha256, bytes, target, input, from_stage, prev_input_scale,
held-out R² and error split; see trainer/stack_error.py},
optional meta_sae {file, sha256, bytes, width, k, sae_config, metrics} (trainer/meta_sae.py),
optional onnx {file, sha256, bytes, codes, inputs, outputs, source, ...} written by
`export-onnx` (see trainer/stack_manifest.py), free-form extras/training/metrics), optional stack-level
`metrics`, and `files`, every file of the stack with its sha256 and size. `read_stack` verifies all of
it before any tensor is used: supported version, plain file names inside the directory (no `..`, no symlink out, never a
pickle), sizes and hashes, safetensors headers against the shapes the SAE config implies (so hostile
shapes never allocate), and the host model when the caller names it. Failures raise `StackError`.
Imports only torch, safetensors and the standard library: the service imports this module. The
torch-free parts (manifest, names, hashes, ONNX records) live in trainer/stack_manifest.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file
from torch import Tensor

from trainer import __version__
from trainer.sae.base import ARCHITECTURES, SAEConfig, SparseAutoencoder, build_sae
from trainer.stack_affine import AffineMap
from trainer.stack_error import ErrorPredictor
from trainer.stack_identity import HostModelIdentity, model_fingerprint, weights_fingerprint
from trainer.stack_manifest import (
    MANIFEST,
    SUPPORTED_FORMAT_VERSIONS,
    StackError,
    attach_onnx,
    check_dimensions,
    check_meta_entry,
    check_onnx_entry,
    dump_manifest,
    file_sha256,
    load_manifest,
    safe_name,
    verify_files,
)

__all__ = [
    "FORMAT_VERSION", "HostModelIdentity", "LoadedStack", "LoadedStage", "StackError", "StageSpec", "attach_onnx",
    "file_sha256", "model_fingerprint", "read_stack", "stack_digest", "update_metrics", "weights_fingerprint",
    "write_stack",
]

FORMAT_VERSION = 1
assert FORMAT_VERSION in SUPPORTED_FORMAT_VERSIONS
MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
Header = dict[str, tuple[str, tuple[int, ...]]]  # tensor name -> (safetensors dtype, shape)



# ----------------------------------------------------------------------------------------------- writing


@dataclass
class StageSpec:
    """One stage to write: the SAE, where it reads, its input scale, and free-form records."""

    sae: SparseAutoencoder
    hookpoint: str
    input_scale: float = 1.0
    name: str | None = None  # defaults to the hookpoint
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    extra_tensors: dict[str, Tensor] | None = None
    residual_of: int | None = None  # ReSAE: the earlier stage whose activation the affine map reads
    affine: AffineMap | None = None  # its input_scale must be affine.residual_scale
    error_predictor: ErrorPredictor | None = None  # error-norm probes (trainer/stack_error.py)
    meta_sae: SparseAutoencoder | None = None  # a meta-SAE over the decoder rows (trainer/meta_sae.py)
    meta_metrics: dict[str, Any] = field(default_factory=dict)


def _write_tensors(directory: Path, file: str, tensors: Mapping[str, Tensor]) -> dict[str, Any]:
    copies = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
              for k, v in tensors.items()}
    save_file(copies, str(directory / file))
    return {"file": file, "sha256": file_sha256(directory / file), "bytes": (directory / file).stat().st_size}


def _stage_entry(index: int, spec: StageSpec, directory: Path) -> dict[str, Any]:
    if not safe_name(spec.hookpoint) or len(spec.hookpoint) > 120:
        raise StackError(f"stage {index}: hookpoint {spec.hookpoint!r} must be a plain name (blocks.3.hook_resid_post)")
    scale = spec.input_scale
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale <= 0:
        raise StackError(f"stage {index}: input_scale must be a finite number > 0, got {scale!r}")
    cfg, stem = spec.sae.cfg, f"stage_{index:02d}_{spec.hookpoint}"
    entry: dict[str, Any] = {
        "index": index, "name": spec.name or spec.hookpoint, "hookpoint": spec.hookpoint,
        "architecture": cfg.architecture, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "signed": bool(spec.sae.signed),
        "input_scale": float(scale), "sae_config": cfg.to_dict(),
        **_write_tensors(directory, f"{stem}.safetensors", spec.sae.state_dict()),
    }
    if spec.extra_tensors:
        extra = _write_tensors(directory, f"{stem}.extra.safetensors", spec.extra_tensors)
        entry["extra_tensors"] = extra | {"keys": {k: list(v.shape) for k, v in spec.extra_tensors.items()}}
    if (spec.residual_of is None) != (spec.affine is None):
        raise StackError(f"stage {index}: a residual stage needs both residual_of and affine")
    if spec.affine is not None:
        if not (isinstance(spec.residual_of, int) and 0 <= spec.residual_of < index):
            raise StackError(f"stage {index}: residual_of must name an earlier stage, got {spec.residual_of!r}")
        if not math.isclose(scale, spec.affine.residual_scale, rel_tol=1e-6):
            raise StackError(f"stage {index}: input_scale {scale} must equal the residual scale "
                             f"{spec.affine.residual_scale}")
        affine = _write_tensors(directory, f"{stem}.affine.safetensors", spec.affine.tensors())
        entry["residual"] = {"from_stage": spec.residual_of, **affine, **spec.affine.metadata()}
    if (probes := spec.error_predictor) is not None:
        source = probes.from_stage
        if source is not None and not (isinstance(source, int) and 0 <= source < index):
            raise StackError(f"stage {index}: the error predictor's from_stage must name an earlier stage")
        written = _write_tensors(directory, f"{stem}.error.safetensors", probes.tensors())
        entry["error_predictor"] = probes.metadata() | written
    if (meta := spec.meta_sae) is not None:
        if meta.d_in != cfg.d_in:
            raise StackError(f"stage {index}: the meta-SAE reads d_in={meta.d_in} rows, the decoder has {cfg.d_in}")
        written = _write_tensors(directory, f"{stem}.meta.safetensors", meta.state_dict())
        entry["meta_sae"] = written | {"width": meta.d_sae, "k": meta.cfg.k, "sae_config": meta.cfg.to_dict(),
                                       "metrics": dict(spec.meta_metrics)}
    return entry | {"extras": spec.extras, "training": spec.training, "metrics": spec.metrics}


def _check_residual_widths(entries: list[dict[str, Any]]) -> None:
    for entry in entries:
        if residual := entry.get("residual"):
            source = entries[residual["from_stage"]]
            if source["hookpoint"] == entry["hookpoint"]:
                raise StackError(f"stage {entry['index']}: a residual stage must read a different hookpoint")


def write_stack(
    out_dir: str | Path, name: str, identity: HostModelIdentity, stages: list[StageSpec], *, overwrite: bool = False,
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Write a stack directory atomically: files go to a temporary sibling that is renamed into place
    last, so a crash never leaves a half-written stack at `out_dir`."""
    out_dir = Path(out_dir)
    names = [s.name or s.hookpoint for s in stages]
    if not stages or len(set(names)) != len(names):
        raise StackError(f"a stack needs at least one stage and unique stage names, got {names}")
    if out_dir.exists() and not overwrite:
        raise StackError(f"{out_dir} already exists; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex}.tmp")
    old = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex}.old")
    tmp.mkdir()
    try:
        entries = [_stage_entry(i, spec, tmp) for i, spec in enumerate(stages)]
        _check_residual_widths(entries)
        records = [r for e in entries for r in (e, e.get("extra_tensors"), e.get("residual"), e.get("error_predictor"))
                   if r]
        records += [e["meta_sae"] for e in entries if e.get("meta_sae")]
        dump_manifest(tmp / MANIFEST, {
            "format_version": FORMAT_VERSION, "name": name, "created_by": f"featurewire-trainer {__version__}",
            "host_model": asdict(identity), "stages": entries, "metrics": dict(metrics or {}),
            "files": {r["file"]: {"sha256": r["sha256"], "bytes": r["bytes"]} for r in records},
        })
        if out_dir.exists():
            os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if old.exists():
                os.replace(old, out_dir)  # put the previous stack back
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def update_metrics(stack_dir: str | Path, stage_index: int | None, metrics: Mapping[str, Any]) -> None:
    """Merge `metrics` into one stage's metrics (or the stack's, for None) and rewrite stack.json; files
    and hashes are untouched."""
    manifest, _ = load_manifest(Path(stack_dir))
    if stage_index is None:
        target = manifest
    elif 0 <= stage_index < len(manifest["stages"]):
        target = manifest["stages"][stage_index]
    else:
        raise StackError(f"stage index {stage_index} out of range: the stack has {len(manifest['stages'])} stages")
    if not isinstance(target.get("metrics", {}), dict):
        raise StackError("stack.json: metrics must be an object")
    target.setdefault("metrics", {}).update(metrics)
    dump_manifest(Path(stack_dir) / MANIFEST, manifest)


def stack_digest(stack_dir: str | Path) -> str:
    """sha256 of stack.json; it lists every file's sha256, so this names the whole stack's content."""
    path = Path(stack_dir) / MANIFEST
    if not path.is_file():
        raise StackError(f"{path} does not exist: not a stack directory")
    return file_sha256(path)


# ----------------------------------------------------------------------------------------------- reading


@dataclass
class LoadedStage:
    index: int
    name: str
    hookpoint: str
    sae: SparseAutoencoder  # built, weights loaded, eval mode, on the requested device
    input_scale: float
    signed: bool
    extras: dict[str, Any]
    extra_tensors: dict[str, Tensor]
    training: dict[str, Any]
    metrics: dict[str, Any]
    residual_of: int | None = None
    affine: AffineMap | None = None
    error_predictor: ErrorPredictor | None = None
    meta_sae: SparseAutoencoder | None = None  # meta-latents of its features (trainer/stack_meta.py)


@dataclass
class LoadedStack:
    path: Path
    name: str
    created_by: str
    identity: HostModelIdentity
    stages: list[LoadedStage]
    digest: str  # sha256 of the stack.json that was read (stack_digest)
    metrics: dict[str, Any] = field(default_factory=dict)  # stack-level, e.g. multi-layer splice

    def stage(self, name: str) -> LoadedStage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"stack {self.name!r} has no stage {name!r}; stages: {[s.name for s in self.stages]}")


def _stage_config(index: int, entry: Mapping[str, Any], files: Mapping[str, Any]) -> SAEConfig:
    kinds = {"name": str, "hookpoint": str, "architecture": str, "file": str, "sae_config": dict, "d_in": int,
             "d_sae": int, "input_scale": (int, float)}
    for key, kind in kinds.items():
        if not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
            raise StackError(f"stack.json: stages[{index}].{key} is missing or has the wrong type")
    check_dimensions(index, entry)
    if not math.isfinite(entry["input_scale"]) or entry["input_scale"] <= 0:
        raise StackError(f"stack.json: stages[{index}].input_scale must be finite and > 0")
    if entry["architecture"] not in ARCHITECTURES:
        raise StackError(f"stage {index}: unknown architecture {entry['architecture']!r}; known: {ARCHITECTURES}")
    try:
        cfg = SAEConfig.from_dict(entry["sae_config"])
    except (TypeError, ValueError) as exc:
        raise StackError(f"stage {index}: invalid sae_config: {exc}") from None
    if (cfg.architecture, cfg.d_in, cfg.d_sae) != (entry["architecture"], entry["d_in"], entry["d_sae"]):
        raise StackError(f"stage {index}: sae_config ({cfg.architecture}, {cfg.d_in}, {cfg.d_sae}) disagrees "
                         f"with the stage ({entry['architecture']}, {entry['d_in']}, {entry['d_sae']})")
    extra = entry.get("extra_tensors")
    if extra is not None and not (isinstance(extra, dict) and isinstance(extra.get("keys"), dict) and all(
        isinstance(s, list) and all(type(d) is int for d in s) for s in extra["keys"].values())):
        raise StackError(f"stack.json: stages[{index}].extra_tensors must be an object with file and keys")
    residual = entry.get("residual")
    if residual is not None:
        _check_residual_entry(index, entry, residual)
    probes = entry.get("error_predictor")
    if probes is not None:
        _check_error_predictor_entry(index, probes)
    for file in (entry["file"], extra and extra.get("file"), residual and residual.get("file"),
                 probes and probes.get("file")):
        if file is not None and file not in files:
            raise StackError(f"stage {index}: file {file!r} is not listed in stack.json files")
    check_onnx_entry(index, entry, files)
    _meta_config(index, entry, files)
    return cfg


def _check_residual_entry(index: int, entry: Mapping[str, Any], residual: Any) -> None:
    """A residual stage reads an earlier stage, and its input scale is the residual scale."""
    where = f"stack.json: stages[{index}].residual"
    if not isinstance(residual, dict) or not isinstance(residual.get("file"), str):
        raise StackError(f"{where} must be an object with a file")
    source = residual.get("from_stage")
    if type(source) is not int or not 0 <= source < index:
        raise StackError(f"{where}.from_stage must be the index of an earlier stage (0..{index - 1}), got {source!r}")
    for key in ("alpha", "r2_held_out", "residual_scale"):
        if isinstance(residual.get(key), bool) or not isinstance(residual.get(key), int | float):
            raise StackError(f"{where}.{key} is missing or not a number")
    scale = residual["residual_scale"]
    if not (math.isfinite(scale) and scale > 0 and math.isclose(scale, entry["input_scale"], rel_tol=1e-6)):
        raise StackError(f"{where}.residual_scale must be finite, > 0 and equal to the stage's input_scale")
    if not isinstance(residual.get("r2_by_alpha", {}), dict):
        raise StackError(f"{where}.r2_by_alpha must be an object")


def _check_error_predictor_entry(index: int, record: Any) -> None:
    """A stage's error probes: a file, an earlier stage for the previous probe, numbers where numbers go."""
    where = f"stack.json: stages[{index}].error_predictor"
    if not isinstance(record, dict) or not isinstance(record.get("file"), str):
        raise StackError(f"{where} must be an object with a file")
    source = record.get("from_stage")
    if source is not None and not (type(source) is int and 0 <= source < index):
        raise StackError(f"{where}.from_stage must be null or the index of an earlier stage, got {source!r}")
    scale = record.get("prev_input_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not (math.isfinite(scale) and scale > 0):
        raise StackError(f"{where}.prev_input_scale must be a finite number > 0")
    for key in ("norm_r2", "vector_r2", "prev_r2", "nonlinear_share"):
        if record.get(key) is not None and (isinstance(record[key], bool) or not isinstance(record[key], int | float)):
            raise StackError(f"{where}.{key} must be a number or null")


def _header(data: bytes, file: str) -> Header:
    """name -> (dtype, shape) from a safetensors header, parsed without touching the tensor data."""
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    try:
        if not 0 < n <= min(len(data) - 8, MAX_HEADER_BYTES):
            raise ValueError("bad header length")
        header = json.loads(data[8 : 8 + n])
        header.pop("__metadata__", None)
        return {k: (str(v["dtype"]), tuple(int(d) for d in v["shape"])) for k, v in header.items()}
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise StackError(f"stack file {file!r} is not a valid safetensors file: {exc!s:.200}") from None


def _read_tensors(root: Path, file: str, sha256: str, want: Header, what: str) -> dict[str, Tensor]:
    """Read once and re-hash (what is loaded is what was verified); check the header; only then load.
    A `want` dtype of None accepts any supported dtype."""
    data = (root / file).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise StackError(f"stack file {file!r} changed while the stack was being read")
    got = _header(data, file)
    problems = [f"{k} is {got[k][0]} {got[k][1]}, expected {want[k][0] or 'a supported dtype'} {want[k][1]}"
                for k in sorted(got.keys() & want.keys())
                if got[k][1] != want[k][1] or got[k][0] not in ({want[k][0]} - {None} or set(_ST_DTYPES.values()))]
    problems += [f"missing {k}" for k in sorted(want.keys() - got.keys())]
    problems += [f"unexpected {k}" for k in sorted(got.keys() - want.keys())]
    if problems:
        raise StackError(f"stack file {file!r} does not match {what}: {'; '.join(problems)}")
    try:
        return load_safetensors_bytes(data)
    except Exception as exc:  # safetensors raises its own error type (e.g. for inconsistent offsets)
        raise StackError(f"stack file {file!r} could not be read: {exc}") from None


def _expected_state(cfg: SAEConfig) -> Header:
    """The tensors a stage file must hold, from the SAE built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        state = build_sae(cfg).state_dict()
    return {k: (_ST_DTYPES.get(torch.float32 if v.is_floating_point() else v.dtype, "?"), tuple(v.shape))
            for k, v in state.items()}


def _build_stage(root: Path, index: int, entries: list[dict], cfg: SAEConfig, files: dict, device: str) -> LoadedStage:
    entry = entries[index]
    what = f"stage {index}'s config ({cfg.architecture} d_in={cfg.d_in} d_sae={cfg.d_sae})"
    state = _read_tensors(root, entry["file"], files[entry["file"]]["sha256"], _expected_state(cfg), what)
    extra_tensors: dict[str, Tensor] = {}
    if extra := entry.get("extra_tensors"):
        want = {k: (None, tuple(shape)) for k, shape in extra["keys"].items()}
        extra_tensors = _read_tensors(root, extra["file"], files[extra["file"]]["sha256"], want, "its declared keys")
    affine = None
    if residual := entry.get("residual"):
        d_prev = entries[residual["from_stage"]]["d_in"]
        want = {"A": ("F32", (cfg.d_in, d_prev)), "c": ("F32", (cfg.d_in,))}
        tensors = _read_tensors(root, residual["file"], files[residual["file"]]["sha256"], want,
                                f"an affine map from d={d_prev} to d={cfg.d_in}")
        affine = AffineMap.from_tensors({k: v.to(device) for k, v in tensors.items()}, residual)
    error_predictor = None
    if probes := entry.get("error_predictor"):
        d_prev = None if probes.get("from_stage") is None else entries[probes["from_stage"]]["d_in"]
        want = {k: ("F32", shape) for k, shape in ErrorPredictor.expected_shapes(cfg.d_in, d_prev).items()}
        what = f"error probes for d={cfg.d_in}" + (f" and a previous stage of d={d_prev}" if d_prev else "")
        tensors = _read_tensors(root, probes["file"], files[probes["file"]]["sha256"], want, what)
        error_predictor = ErrorPredictor.from_tensors({k: v.to(device) for k, v in tensors.items()}, probes)
    meta_sae = _load_meta_sae(root, index, entry, files, device)
    with torch.random.fork_rng(devices=[]):  # building initialises weights: leave the caller's RNG alone
        sae = build_sae(cfg)
    sae.load_state_dict(state, strict=True)
    sae.requires_grad_(False).eval().to(device)
    return LoadedStage(
        index=index, name=entry["name"], hookpoint=entry["hookpoint"], sae=sae, input_scale=float(entry["input_scale"]),
        signed=bool(sae.signed), extras=dict(entry.get("extras") or {}),
        extra_tensors={k: v.to(device) for k, v in extra_tensors.items()},
        training=dict(entry.get("training") or {}), metrics=dict(entry.get("metrics") or {}),
        residual_of=residual["from_stage"] if residual else None, affine=affine, error_predictor=error_predictor,
        meta_sae=meta_sae,
    )


def _meta_config(index: int, entry: Mapping[str, Any], files: Mapping[str, Any]) -> SAEConfig | None:
    """The config of the stage's meta-SAE, which must read the stage's d_in-wide rows with its width and k."""
    record = check_meta_entry(index, entry, files)
    if record is None:
        return None
    try:
        cfg = SAEConfig.from_dict(record["sae_config"])
    except (TypeError, ValueError) as exc:
        raise StackError(f"stage {index}: invalid meta_sae.sae_config: {exc}") from None
    if (cfg.d_in, cfg.d_sae, cfg.k) != (entry["d_in"], record["width"], record["k"]):
        raise StackError(f"stage {index}: meta_sae.sae_config (d_in={cfg.d_in}, d_sae={cfg.d_sae}, k={cfg.k}) "
                         f"disagrees with the stage's d_in {entry['d_in']} and the record's width and k")
    return cfg


def _load_meta_sae(root: Path, index: int, entry: Mapping[str, Any], files: Mapping[str, Any],
                   device: str) -> SparseAutoencoder | None:
    cfg = _meta_config(index, entry, files)
    if cfg is None:
        return None
    file = entry["meta_sae"]["file"]
    state = _read_tensors(root, file, files[file]["sha256"], _expected_state(cfg),
                          f"stage {index}'s meta-SAE config ({cfg.architecture} d_in={cfg.d_in} d_sae={cfg.d_sae})")
    with torch.random.fork_rng(devices=[]):
        meta = build_sae(cfg)
    meta.load_state_dict(state, strict=True)
    return meta.requires_grad_(False).eval().to(device)


def read_stack(
    stack_dir: str | Path, *, expect_model: HostModelIdentity | None = None, device: str | torch.device = "cpu"
) -> LoadedStack:
    """Verify a stack directory completely, then build its SAEs (eval mode, no grad, on `device`)."""
    root = Path(stack_dir)
    manifest, digest = load_manifest(root)
    identity = HostModelIdentity.from_dict(manifest.get("host_model"))
    name = manifest.get("name")
    if not isinstance(name, str):
        raise StackError("stack.json: name must be a string")
    if expect_model is not None and (diff := identity.differences(expect_model)):
        raise StackError(f"stack {name!r} was made for {identity.describe()}, this model is "
                         f"{expect_model.describe()}: {', '.join(diff)} differ")
    stages, files = manifest["stages"], manifest["files"]
    configs = [_stage_config(i, entry, files) for i, entry in enumerate(stages)]
    if len({s["name"] for s in stages}) != len(stages):
        raise StackError("stack.json: stage names must be unique")
    verify_files(root, files)
    try:
        _check_residual_widths(stages)
    except (KeyError, TypeError):
        raise StackError("stack.json: stages need hookpoint and index fields") from None
    built = [_build_stage(root, i, stages, cfg, files, str(device)) for i, cfg in enumerate(configs)]
    metrics = manifest.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise StackError("stack.json: metrics must be an object")
    return LoadedStack(root, name, str(manifest.get("created_by", "")), identity, built, digest, dict(metrics))
