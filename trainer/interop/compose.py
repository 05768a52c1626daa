"""Several imported SAEs (SAELens, sparsify, Gemma Scope; by directory or by release) composed into one stack.

Each SAE is described by an `SAESource`; `compose_stack` imports them all, checks that they belong together (one
host model as far as the sources name it, one width, distinct hookpoints), checks each against the host model's
hookpoint, and writes one stack whose stages run in forward order (layer, then resid_pre < attn_out < mlp_out <
resid_post). `make_explorer_ready` then records evaluation metrics (which the server's self-check reads) and
computes the dashboards and token labels (which GetFeature, ListFeatures and the explorer show).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from core.config import ModelConfig
from core.host.hookpoints import KIND_ORDER, HookKind
from core.stack.identity import HostModelIdentity
from core.stack.writer import write_stack
from trainer.interop.hub_cache import resolve_files
from trainer.interop.importers import (
    ImportedSAE,
    SAEImportError,
    import_saelens,
    import_sparsify,
    saelens_from_parts,
)
from trainer.interop.saelens_releases import gemma_scope_parts, resolve_release

SOURCES = ("saelens", "sparsify")
SPEC_KEYS = ("from", "dir", "release", "id", "hookpoint", "input_scale", "revision")


@dataclass(frozen=True)
class SAESource:
    """One SAE to import: a local directory, or a release (or repository id) and sae id in the hub cache."""

    source: str  # saelens | sparsify (the file format of a directory or repository folder)
    directory: str | None = None
    release: str | None = None
    sae_id: str | None = None
    hookpoint: str | None = None  # overrides the one the SAE names
    input_scale: float | None = None
    revision: str = "main"

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise SAEImportError(f"unknown source {self.source!r}; use {' or '.join(SOURCES)}")
        if (self.directory is None) == (self.release is None):
            raise SAEImportError("name an SAE either by directory or by release and sae id, not both or neither")
        if self.release is not None and not self.sae_id:
            raise SAEImportError(f"release {self.release!r} needs an sae id (--sae-id, or id= in --sae)")

    def describe(self) -> str:
        where = self.directory if self.directory is not None else f"{self.release} {self.sae_id}"
        return f"{self.source} {where}"


def parse_sae_spec(text: str) -> SAESource:
    """`--sae from=saelens,dir=PATH` or `--sae from=saelens,release=R,id=ID[,hookpoint=H][,input_scale=S]`."""
    fields: dict[str, str] = {}
    for part in (p for p in text.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in SPEC_KEYS or key in fields:
            raise SAEImportError(f"--sae {text!r}: expected comma-separated KEY=VALUE with keys {', '.join(SPEC_KEYS)} "
                                 "(each once), e.g. from=sparsify,dir=out/layers.3 or "
                                 "from=saelens,release=gemma-scope-2b-pt-res-canonical,id=layer_20/width_16k/canonical")
        fields[key] = value.strip()
    scale = fields.get("input_scale")
    try:
        input_scale = float(scale) if scale is not None else None
    except ValueError:
        raise SAEImportError(f"--sae {text!r}: input_scale must be a number, got {scale!r}") from None
    return SAESource(fields.get("from", "saelens"), directory=fields.get("dir"), release=fields.get("release"),
                     sae_id=fields.get("id"), hookpoint=fields.get("hookpoint"), input_scale=input_scale,
                     revision=fields.get("revision", "main"))


def load_source(spec: SAESource, *, download: bool = False,
                environ: Mapping[str, str] = os.environ) -> ImportedSAE:
    """Import one SAE; a release is read from the hub cache (downloading only with `download`)."""
    if spec.directory is not None:
        if spec.source == "saelens":
            return import_saelens(spec.directory, hookpoint=spec.hookpoint, input_scale=spec.input_scale)
        return import_sparsify(spec.directory, hookpoint=spec.hookpoint, input_scale=spec.input_scale or 1.0)
    assert spec.release is not None and spec.sae_id is not None
    found = resolve_release(spec.release, spec.sae_id, source=spec.source)
    paths = resolve_files(found.repo_id, found.filenames(), revision=spec.revision, download=download,
                          environ=environ)
    folder = next(iter(paths.values())).parent
    scale = spec.input_scale if spec.input_scale is not None else found.input_scale
    if found.files == "gemma_scope":
        cfg, tensors = gemma_scope_parts(folder / "params.npz", found.folder, found.repo_id, found.model)
        imported = saelens_from_parts(cfg, tensors, hookpoint=spec.hookpoint, input_scale=scale)
    elif found.files == "saelens":
        imported = import_saelens(folder, hookpoint=spec.hookpoint, input_scale=scale)
    else:
        imported = import_sparsify(folder, hookpoint=spec.hookpoint, input_scale=scale or 1.0)
    imported.notes.append(f"from {found.repo_id}/{found.folder} (release {spec.release!r}, id {spec.sae_id!r})")
    imported.source_config = {**imported.source_config, "release": spec.release, "sae_id": spec.sae_id,
                              "repo_id": found.repo_id, "folder": found.folder}
    if imported.model_name is None and found.model is not None:
        imported = replace(imported, model_name=found.model)
    return imported


def import_into_stack(
    source: str, src_dir: str | Path, *, model: str, out_dir: str | Path, hookpoint: str | None = None,
    input_scale: float | None = None, name: str | None = None, overwrite: bool = False,
) -> Path:
    """One SAE directory into a one-stage stack for `model` (checked against the host's hookpoint)."""
    spec = SAESource(source, directory=str(src_dir), hookpoint=hookpoint, input_scale=input_scale)
    config = ModelConfig.from_env(os.environ, name=model, device="cpu")
    return compose_stack([spec], model=config, out_dir=out_dir, name=name, overwrite=overwrite)


def hookpoint_order(hookpoint: str) -> tuple[int, int]:
    """Forward order of a canonical hookpoint: its layer, then its place inside the block."""
    layer, kind = re.fullmatch(r"blocks\.(\d+)\.(\w+)", hookpoint).groups()  # type: ignore[union-attr]
    return int(layer), KIND_ORDER[HookKind(kind)]


def _model_key(name: str) -> str:
    return name.strip().lower().rsplit("/", 1)[-1]


def check_together(specs: Sequence[SAESource], imported: Sequence[ImportedSAE]) -> list[str]:
    """The hookpoints in input order; refuses SAEs that do not belong in one stack, saying which and why."""
    hookpoints = []
    for spec, sae in zip(specs, imported, strict=True):
        if sae.hookpoint is None:
            raise SAEImportError(f"{spec.describe()}: no canonical hookpoint known; give one (hookpoint= in --sae, "
                                 "or --hookpoint), e.g. blocks.6.hook_resid_post")
        hookpoints.append(sae.hookpoint)
    widths = {sae.sae.d_in for sae in imported}
    if len(widths) > 1:
        listed = "; ".join(f"{s.describe()} reads {i.sae.d_in}" for s, i in zip(specs, imported, strict=True))
        raise SAEImportError(f"the SAEs read vectors of different widths (d_model), so they cannot belong to one host "
                             f"model: {listed}")
    models = {_model_key(i.model_name) for i in imported if i.model_name}
    if len(models) > 1:
        listed = "; ".join(f"{s.describe()}: {i.model_name or 'not named'}"
                           for s, i in zip(specs, imported, strict=True))
        raise SAEImportError(f"the SAEs were trained on different host models: {listed}")
    seen: dict[str, str] = {}
    for spec, point in zip(specs, hookpoints, strict=True):
        if point in seen:
            raise SAEImportError(f"two SAEs hook {point} ({seen[point]} and {spec.describe()}); a stack holds one "
                                 "stage per hookpoint")
        seen[point] = spec.describe()
    return hookpoints


def compose_stack(specs: Sequence[SAESource], *, model: ModelConfig, out_dir: str | Path, name: str | None = None,
                  download: bool = False, overwrite: bool = False,
                  environ: Mapping[str, str] = os.environ) -> Path:
    """Import every SAE, check them against each other and the host model, and write one stack in forward order."""
    from core.errors import ServiceError  # the host runtime is heavy: only this path needs it
    from core.host.loading import load_host_model

    if not specs:
        raise SAEImportError("name at least one SAE to import")
    if Path(out_dir).exists() and not overwrite:
        raise SAEImportError(f"{out_dir} already exists; pass --overwrite to replace it")
    imported = [load_source(spec, download=download, environ=environ) for spec in specs]
    hookpoints = check_together(specs, imported)
    host = load_host_model(model)
    for spec, sae, point in zip(specs, imported, hookpoints, strict=True):
        try:
            width = host.hookpoints.get(point).dim
        except ServiceError as exc:
            raise SAEImportError(f"{spec.describe()}: {exc}") from None
        if width != sae.sae.d_in:
            raise SAEImportError(f"{spec.describe()}: the SAE reads {sae.sae.d_in}-dim vectors but {point} of "
                                 f"{host.name} is {width}-dim: wrong model or hookpoint")
    order = sorted(range(len(specs)), key=lambda i: hookpoint_order(hookpoints[i]))
    stages = [imported[i].stage_spec() for i in order]
    if name is None:
        name = f"{imported[0].source}-{hookpoints[0]}" if len(specs) == 1 else f"imported-{len(specs)}-saes"
    identity = HostModelIdentity.from_model(host.model, host.name)
    return write_stack(out_dir, name, identity, stages, overwrite=overwrite)


@dataclass(frozen=True)
class ExplorerSettings:
    """How much held-out text the metrics and dashboards of `--explorer-ready` read."""

    corpus: str | None = None  # default: the corpus the stack names, else the built-in default
    eval_tokens: int = 8192
    ce_windows: int = 16
    dashboard_tokens: int = 50_000
    label_tokens: int = 8  # 0: no token labels

    def __post_init__(self) -> None:
        if self.eval_tokens < 1 or self.ce_windows < 1 or self.dashboard_tokens < 1 or self.label_tokens < 0:
            raise ValueError("--eval-tokens, --ce-windows and --dashboard-tokens must be at least 1, --label-tokens "
                             f"at least 0; got {self}")


def make_explorer_ready(stack_dir: str | Path, model: ModelConfig, settings: ExplorerSettings, *,
                        progress: bool = True) -> dict[str, Any]:
    """Record evaluation metrics in the stack and compute its dashboards (with token labels), one host load."""
    from core.stack.runtime import StackRuntime
    from core.stack.writer import update_metrics
    from trainer.dashboards.accumulator import DashboardSettings
    from trainer.dashboards.build import build_dashboards
    from trainer.evaluation.evaluate import evaluate_runtime
    from trainer.evaluation.held_out import open_held_out

    held = open_held_out(stack_dir, corpus=settings.corpus, model_config=model)
    metrics, stack_metrics = evaluate_runtime(
        held.host, StackRuntime.from_loaded(held.stack), held.documents, context_length=held.context_length,
        batch_size=held.batch_size, max_tokens=settings.eval_tokens, ce_windows=settings.ce_windows)
    for index, stage_metrics in enumerate(metrics):
        update_metrics(stack_dir, index, stage_metrics)
    if stack_metrics:
        update_metrics(stack_dir, None, stack_metrics)
    summary = build_dashboards(stack_dir, held.host, held.documents, corpus=held.corpus,
                               settings=DashboardSettings(label_n=settings.label_tokens),
                               context_length=held.context_length, batch_size=held.batch_size,
                               max_tokens=settings.dashboard_tokens, progress=progress)
    return {"corpus": held.corpus, "stages": metrics, "metrics": stack_metrics, "dashboards": summary}

