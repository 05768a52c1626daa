"""The SAE stack directory, the contract between the trainer and the service: write, read, verify.

    stack.json                                         manifest (format_version 1), written last
    stage_00_blocks.3.hook_resid_post.safetensors      stage 0's SAE state_dict, contiguous fp32
    stage_00_blocks.3.hook_resid_post.extra.safetensors  optional per-stage extra tensors
    stage_01_blocks.6.hook_resid_post.affine.safetensors  a residual (ReSAE) stage's predictor A, c
    stage_01_blocks.6.hook_resid_post.error.safetensors   optional error-norm probes (core/stack/error_predictor.py)
    stage_00_blocks.3.hook_resid_post.meta.safetensors    optional meta-SAE over the decoder rows

The manifest holds `name`, `created_by`, `host_model` (a HostModelIdentity), `stages` in forward order
(index, name, hookpoint, architecture, d_in, d_sae, signed, input_scale, sae_config, file/sha256/bytes,
optional extra_tensors {file, sha256, bytes, keys}, optional residual {from_stage, file, sha256, bytes,
alpha, r2_held_out, residual_scale, r2_by_alpha} for a ReSAE stage that reads the residual of the stage
`from_stage`, optional error_predictor {file, sha256, bytes, target, input, from_stage, prev_input_scale,
held-out R² and error split; see core/stack/error_predictor.py},
optional meta_sae {file, sha256, bytes, width, k, sae_config, metrics} (trainer/training/meta_sae.py),
optional onnx {file, sha256, bytes, codes, inputs, outputs, source, ...} written by
`export-onnx` (see core/stack/manifest.py), free-form extras/training/metrics), optional stack-level
`metrics`, and `files`, every file of the stack with its sha256 and size. `read_stack` verifies all of
it before any tensor is used: supported version, plain file names inside the directory (no `..`, no symlink out, never a
pickle), sizes and hashes, safetensors headers against the shapes the SAE config implies (so hostile
shapes never allocate), and the host model when the caller names it. Failures raise `StackError`.
This module reads; core/stack/writer.py writes, core/stack/tensors.py checks and loads the safetensors
files, and the torch-free parts (manifest, names, hashes, ONNX records) live in core/stack/manifest.py.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.sae.base import SAEConfig, SparseAutoencoder
from core.sae.registry import ARCHITECTURES, build_sae
from core.stack.affine import AffineMap
from core.stack.dashboards import check_dashboard_entry, parse_explanations
from core.stack.error_predictor import ErrorPredictor
from core.stack.identity import HostModelIdentity
from core.stack.manifest import (
    StackError,
    check_dimensions,
    check_meta_entry,
    check_onnx_entry,
    check_residual_hookpoints,
    load_manifest,
    verify_files,
)
from core.stack.steerability import check_steerability_entry, read_steerability
from core.stack.tensors import expected_state, read_tensors


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
    meta_sae: SparseAutoencoder | None = None  # meta-latents of its features (core/stack/meta_sae.py)
    dashboard: dict[str, Tensor] | None = None  # per-feature dashboards (core/stack/dashboards.py), on the CPU
    dashboard_record: dict[str, Any] = field(default_factory=dict)  # its manifest record (tokens, corpus, ...)
    steerability: dict[str, Any] | None = None  # measured steerability (core/stack/steerability.py), if any


@dataclass
class LoadedStack:
    path: Path
    name: str
    created_by: str
    identity: HostModelIdentity
    stages: list[LoadedStage]
    digest: str  # sha256 of the stack.json that was read (stack_digest)
    metrics: dict[str, Any] = field(default_factory=dict)  # stack-level, e.g. multi-layer splice
    explanations: dict[str, dict[int, str]] = field(default_factory=dict)  # stage name -> feature -> text

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
    check_dashboard_entry(index, entry, files)
    check_steerability_entry(index, entry, files)
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


def _build_stage(root: Path, index: int, entries: list[dict], cfg: SAEConfig, files: dict, device: str) -> LoadedStage:
    entry = entries[index]
    what = f"stage {index}'s config ({cfg.architecture} d_in={cfg.d_in} d_sae={cfg.d_sae})"
    state = read_tensors(root, entry["file"], files[entry["file"]]["sha256"], expected_state(cfg), what)
    extra_tensors: dict[str, Tensor] = {}
    if extra := entry.get("extra_tensors"):
        want = {k: (None, tuple(shape)) for k, shape in extra["keys"].items()}
        extra_tensors = read_tensors(root, extra["file"], files[extra["file"]]["sha256"], want, "its declared keys")
    affine = None
    if residual := entry.get("residual"):
        d_prev = entries[residual["from_stage"]]["d_in"]
        want = {"A": ("F32", (cfg.d_in, d_prev)), "c": ("F32", (cfg.d_in,))}
        tensors = read_tensors(root, residual["file"], files[residual["file"]]["sha256"], want,
                                f"an affine map from d={d_prev} to d={cfg.d_in}")
        affine = AffineMap.from_tensors({k: v.to(device) for k, v in tensors.items()}, residual)
    error_predictor = None
    if probes := entry.get("error_predictor"):
        d_prev = None if probes.get("from_stage") is None else entries[probes["from_stage"]]["d_in"]
        want = {k: ("F32", shape) for k, shape in ErrorPredictor.expected_shapes(cfg.d_in, d_prev).items()}
        what = f"error probes for d={cfg.d_in}" + (f" and a previous stage of d={d_prev}" if d_prev else "")
        tensors = read_tensors(root, probes["file"], files[probes["file"]]["sha256"], want, what)
        error_predictor = ErrorPredictor.from_tensors({k: v.to(device) for k, v in tensors.items()}, probes)
    meta_sae = _load_meta_sae(root, index, entry, files, device)
    dashboard = None
    if (shape := check_dashboard_entry(index, entry, files)) is not None:
        file = entry["dashboard"]["file"]
        dashboard = read_tensors(root, file, files[file]["sha256"], shape.header(), f"stage {index}'s dashboard record")
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
        meta_sae=meta_sae, dashboard=dashboard, dashboard_record=dict(entry.get("dashboard") or {}),
        steerability=read_steerability(root, index, entry, files, cfg.d_sae),
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
    state = read_tensors(root, file, files[file]["sha256"], expected_state(cfg),
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
        check_residual_hookpoints(stages)
    except (KeyError, TypeError):
        raise StackError("stack.json: stages need hookpoint and index fields") from None
    built = [_build_stage(root, i, stages, cfg, files, str(device)) for i, cfg in enumerate(configs)]
    metrics = manifest.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise StackError("stack.json: metrics must be an object")
    explanations = _read_explanations(root, manifest, {s.name: s.sae.d_sae for s in built})
    return LoadedStack(root, name, str(manifest.get("created_by", "")), identity, built, digest, dict(metrics),
                       explanations)


def _read_explanations(root: Path, manifest: Mapping[str, Any],
                       stages: Mapping[str, int]) -> dict[str, dict[int, str]]:
    """The stack's explanations (stage name -> feature -> text), re-hashed as read; empty when it has none."""
    record = manifest.get("explanations")
    if record is None:
        return {}
    if not (isinstance(record, dict) and isinstance(record.get("file"), str) and record["file"] in manifest["files"]):
        raise StackError("stack.json: explanations must be an object naming a listed file")
    file = record["file"]
    data = (root / file).read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest["files"][file]["sha256"]:
        raise StackError(f"stack file {file!r} changed while the stack was being read")
    return parse_explanations(data, stages)
