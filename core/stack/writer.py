"""Writing a stack directory atomically (temporary sibling renamed into place), and updating its metrics.

The format is described in docs/stack-format.md; the reader (core/stack/reader.py) verifies everything
written here.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from core import __version__
from core.sae.base import SparseAutoencoder
from core.stack.affine import AffineMap
from core.stack.dashboards import check_dashboard_entry
from core.stack.error_predictor import ErrorPredictor
from core.stack.identity import HostModelIdentity
from core.stack.manifest import (
    MANIFEST,
    SUPPORTED_FORMAT_VERSIONS,
    StackError,
    attach_records,
    check_residual_hookpoints,
    dump_manifest,
    file_sha256,
    load_manifest,
    safe_name,
)
from core.stack.tensors import ST_DTYPES, write_tensors

FORMAT_VERSION = 1
assert FORMAT_VERSION in SUPPORTED_FORMAT_VERSIONS


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
    error_predictor: ErrorPredictor | None = None  # error-norm probes (core/stack/error_predictor.py)
    meta_sae: SparseAutoencoder | None = None  # a meta-SAE over the decoder rows (trainer/training/meta_sae.py)
    meta_metrics: dict[str, Any] = field(default_factory=dict)


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
        **write_tensors(directory, f"{stem}.safetensors", spec.sae.state_dict()),
    }
    if spec.extra_tensors:
        extra = write_tensors(directory, f"{stem}.extra.safetensors", spec.extra_tensors)
        entry["extra_tensors"] = extra | {"keys": {k: list(v.shape) for k, v in spec.extra_tensors.items()}}
    if (spec.residual_of is None) != (spec.affine is None):
        raise StackError(f"stage {index}: a residual stage needs both residual_of and affine")
    if spec.affine is not None:
        if not (isinstance(spec.residual_of, int) and 0 <= spec.residual_of < index):
            raise StackError(f"stage {index}: residual_of must name an earlier stage, got {spec.residual_of!r}")
        if not math.isclose(scale, spec.affine.residual_scale, rel_tol=1e-6):
            raise StackError(f"stage {index}: input_scale {scale} must equal the residual scale "
                             f"{spec.affine.residual_scale}")
        affine = write_tensors(directory, f"{stem}.affine.safetensors", spec.affine.tensors())
        entry["residual"] = {"from_stage": spec.residual_of, **affine, **spec.affine.metadata()}
    if (probes := spec.error_predictor) is not None:
        source = probes.from_stage
        if source is not None and not (isinstance(source, int) and 0 <= source < index):
            raise StackError(f"stage {index}: the error predictor's from_stage must name an earlier stage")
        written = write_tensors(directory, f"{stem}.error.safetensors", probes.tensors())
        entry["error_predictor"] = probes.metadata() | written
    if (meta := spec.meta_sae) is not None:
        if meta.d_in != cfg.d_in:
            raise StackError(f"stage {index}: the meta-SAE reads d_in={meta.d_in} rows, the decoder has {cfg.d_in}")
        written = write_tensors(directory, f"{stem}.meta.safetensors", meta.state_dict())
        entry["meta_sae"] = written | {"width": meta.d_sae, "k": meta.cfg.k, "sae_config": meta.cfg.to_dict(),
                                       "metrics": dict(spec.meta_metrics)}
    return entry | {"extras": spec.extras, "training": spec.training, "metrics": spec.metrics}


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
        check_residual_hookpoints(entries)
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


def attach_dashboards(stack_dir: str | Path, dashboards: Mapping[int, tuple[Mapping[str, Tensor], Mapping[str, Any]]],
                      ) -> list[str]:
    """Store feature dashboards in a stack: {stage index: (tensors, record fields)}; the tensors must match the
    shape the record's integers declare (core/stack/dashboards.py), which is checked here as the reader will."""
    manifest, _ = load_manifest(Path(stack_dir))
    items = {}
    for index, (tensors, fields) in dashboards.items():
        entry = manifest["stages"][index] if 0 <= index < len(manifest["stages"]) else {}
        shape = check_dashboard_entry(index, {**entry, "dashboard": {"file": "-", **fields}}, {"-": {}})
        assert shape is not None
        got = {k: (ST_DTYPES.get(v.dtype, "?"), tuple(v.shape)) for k, v in tensors.items()}
        if got != shape.header():
            raise StackError(f"stage {index}: the dashboard tensors do not match their record: "
                             f"{sorted(set(got.items()) ^ set(shape.header().items()))[:4]}")
        data = save_safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        items[index] = (data, dict(fields))
    return attach_records(stack_dir, "dashboard", ".safetensors", items)
