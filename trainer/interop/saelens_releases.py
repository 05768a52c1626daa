"""SAELens releases by name: which Hugging Face repository and folder hold an SAE, and in which file format.

SAELens resolves `SAE.from_pretrained(release, sae_id)` through its `pretrained_saes.yaml`: each release names a
`repo_id`, the host `model`, an optional `conversion_func` (the repository's file format when it is not SAELens's
own) and a list of `saes`, each an `id` and the `path` of its folder in the repository. A release that is not in
the table is taken as a repository id and the sae id as the folder (as SAELens does). We cannot depend on
sae-lens, so this module ships the entries of that table for SAEs featurewire can serve exactly on the host
models it supports (Gemma 2/3, Gemma, GPT-NeoX), copied from SAELens's table:

- files "saelens": `{path}/cfg.json` + `{path}/sae_weights.safetensors` (SAELens's own format);
- files "sparsify": `{path}/cfg.json` + `{path}/sae.safetensors` (EleutherAI sparsify);
- files "gemma_scope": `{path}/params.npz` (Gemma Scope: W_enc, W_dec, b_enc, b_dec, threshold; JumpReLU
  reading x, not x − b_dec), converted as SAELens's `gemma_2` loader does.

Left out on purpose: attention hook_z SAEs, transcoders and crosscoders (no featurewire equivalent), and
GPT-2 releases trained on TransformerLens's `center_writing_weights` model, whose residual stream differs
from the Hugging Face model's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from trainer.interop.importers import SAEImportError

FILES = {"saelens": ("cfg.json", "sae_weights.safetensors"), "sparsify": ("cfg.json", "sae.safetensors"),
         "gemma_scope": ("params.npz",)}

# Gemma Scope "canonical" ids map to the folder of the SAE whose L0 is closest to 100 (SAELens's table).
_SCOPE_RES_CANONICAL = {
    "width_16k": dict(enumerate([105, 102, 141, 59, 124, 68, 70, 69, 71, 73, 77, 80, 82, 84, 84, 78, 78, 77, 74, 73,
                                 71, 70, 72, 75, 73, 116])),
    "width_65k": dict(enumerate([73, 121, 77, 89, 89, 105, 107, 107, 111, 118, 128, 70, 72, 75, 73, 127, 128, 125,
                                 116, 115, 114, 111, 116, 123, 124, 93])),
    "width_32k": {12: 76}, "width_262k": {12: 121}, "width_524k": {12: 115}, "width_1m": {5: 114, 12: 107, 19: 88},
}
_SCOPE_MLP_CANONICAL = {
    "width_16k": dict(enumerate([119, 105, 95, 95, 85, 114, 133, 60, 136, 88, 110, 98, 108, 112, 97, 80, 72, 68, 106,
                                 109, 109, 113, 121, 128, 73, 126])),
    "width_65k": dict(enumerate([72, 127, 134, 68, 66, 86, 101, 115, 110, 77, 95, 88, 96, 98, 89, 72, 66, 136, 88, 88,
                                 88, 86, 92, 102, 128, 107])),
}


def _canonical(table: dict[str, dict[int, int]]) -> dict[str, str]:
    return {f"layer_{layer}/{width}/canonical": f"layer_{layer}/{width}/average_l0_{l0}"
            for width, layers in table.items() for layer, l0 in layers.items()}


@dataclass(frozen=True)
class Release:
    repo_id: str
    model: str  # the host model SAELens names
    files: str  # key of FILES
    paths: dict[str, str] | None = None  # sae id -> folder; None: the id is the folder, checked by id_pattern
    id_pattern: str | None = None
    norm_scaling_factors: dict[str, float] | None = None  # input scale of SAEs trained on normalised activations

    def folder(self, release: str, sae_id: str) -> str:
        if self.paths is not None and sae_id in self.paths:
            return self.paths[sae_id]
        if self.paths is None and self.id_pattern and re.fullmatch(self.id_pattern, sae_id):
            return sae_id
        known = sorted(self.paths or [], key=_natural)
        shown = ", ".join(known[:8]) + (f", … ({len(known)} in all)" if len(known) > 8 else "")
        allowed = f"ids such as {shown}" if known else f"ids matching {self.id_pattern}"
        raise SAEImportError(f"release {release!r} has no SAE {sae_id!r}; it has {allowed}")


def _natural(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


_RESID_POST = {f"blocks.{i}.hook_resid_post": f"blocks.{i}.hook_resid_post" for i in range(26)}
RELEASES: dict[str, Release] = {
    "gemma-scope-2b-pt-res": Release("google/gemma-scope-2b-pt-res", "gemma-2-2b", "gemma_scope",
                                     id_pattern=r"layer_\d+/width_\d+[km]/average_l0_\d+"),
    "gemma-scope-2b-pt-res-canonical": Release("google/gemma-scope-2b-pt-res", "gemma-2-2b", "gemma_scope",
                                               paths=_canonical(_SCOPE_RES_CANONICAL)),
    "gemma-scope-2b-pt-mlp": Release("google/gemma-scope-2b-pt-mlp", "gemma-2-2b", "gemma_scope",
                                     id_pattern=r"layer_\d+/width_\d+[km]/average_l0_\d+"),
    "gemma-scope-2b-pt-mlp-canonical": Release("google/gemma-scope-2b-pt-mlp", "gemma-2-2b", "gemma_scope",
                                               paths=_canonical(_SCOPE_MLP_CANONICAL)),
    "gemma-2-2b-res-matryoshka-dc": Release("chanind/gemma-2-2b-batch-topk-matryoshka-saes-w-32k-l0-40",
                                            "gemma-2-2b", "saelens",
                                            paths={k: f"standard/{v}" for k, v in list(_RESID_POST.items())[:25]}),
    "gemma-3-1b-res-matryoshka-dc": Release("chanind/gemma-3-1b-batch-topk-matryoshka-saes-w-32k-l0-40",
                                            "gemma-3-1b", "saelens", paths=dict(list(_RESID_POST.items())[:25])),
    "gemma-2b-res-jb": Release(
        "jbloom/Gemma-2b-Residual-Stream-SAEs", "gemma-2b", "saelens",
        paths={"blocks.0.hook_resid_post": "gemma_2b_blocks.0.hook_resid_post_16384_anthropic",
               "blocks.6.hook_resid_post": "gemma_2b_blocks.6.hook_resid_post_16384_anthropic_fast_lr",
               "blocks.10.hook_resid_post": "gemma_2b_blocks.10.hook_resid_post_16384",
               "blocks.12.hook_resid_post": "gemma_2b_blocks.12.hook_resid_post_16384",
               "blocks.17.hook_resid_post": "gemma_2b_blocks.17.hook_resid_post_16384"},
        norm_scaling_factors={"blocks.12.hook_resid_post": 0.21381938399317255}),
    "pythia-70m-deduped-res-sm": Release(
        "ctigges/pythia-70m-deduped__res-sm_processed", "pythia-70m-deduped", "saelens",
        paths={"blocks.0.hook_resid_pre": "e-res-sm", **{f"blocks.{i}.hook_resid_post": f"{i}-res-sm"
                                                         for i in range(6)}}),
}


@dataclass(frozen=True)
class ResolvedRelease:
    repo_id: str
    folder: str
    files: str  # key of FILES
    model: str | None  # the host model the release names; None for a bare repository id
    input_scale: float | None  # from the table, for SAEs trained on normalised activations

    def filenames(self) -> list[str]:
        return [f"{self.folder}/{name}" if self.folder else name for name in FILES[self.files]]


def resolve_release(release: str, sae_id: str, *, source: str = "saelens") -> ResolvedRelease:
    """A release of the table, or a repository id (ORG/NAME) whose folder `sae_id` holds `source`'s files."""
    sae_id = sae_id.strip("/")
    if release in RELEASES:
        entry = RELEASES[release]
        if source != "saelens" and entry.files != source:
            raise SAEImportError(f"release {release!r} holds {entry.files} files; use --from saelens for it")
        scale = (entry.norm_scaling_factors or {}).get(sae_id)
        return ResolvedRelease(entry.repo_id, entry.folder(release, sae_id), entry.files, entry.model, scale)
    if "/" not in release:
        names = ", ".join(sorted(RELEASES))
        raise SAEImportError(f"unknown release {release!r}: featurewire knows {names}; any other SAELens or sparsify "
                             "repository can be named by its Hugging Face id (ORG/NAME) with --sae-id its folder")
    if ".." in Path(sae_id).parts:
        raise SAEImportError(f"sae id {sae_id!r} must be a folder inside the repository")
    return ResolvedRelease(release, sae_id, source, None, None)


def gemma_scope_parts(params_file: Path, folder: str, repo_id: str, model: str | None
                      ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A SAELens-style config and float64 tensors for a Gemma Scope params.npz (what SAELens's gemma_2 loader
    builds): JumpReLU on x·W_enc + b_enc (b_dec not subtracted), hook from the folder's layer and the repo's site."""
    with np.load(params_file, allow_pickle=False) as data:
        tensors = {("W_" + k[2:] if k.startswith("w_") else k): torch.from_numpy(np.asarray(data[k])).to(torch.float64)
                   for k in data.files}
    if "W_enc" not in tensors or tensors["W_enc"].dim() != 2:
        raise SAEImportError(f"{params_file} has no 2-D W_enc; not a Gemma Scope SAE (has {sorted(tensors)})")
    layer = re.search(r"layer_(\d+)", folder)
    site = next((s for s in ("res", "mlp", "att") if re.search(rf"-{s}\b", repo_id)), None)
    if layer is None or site is None or site == "att":
        raise SAEImportError(f"{repo_id}/{folder}: only Gemma Scope residual (-res) and MLP (-mlp) SAEs of a layer_N "
                             "folder are supported (attention SAEs read per-head hook_z; embedding SAEs hook_embed)")
    hook = f"blocks.{layer.group(1)}.hook_{'resid_post' if site == 'res' else 'mlp_out'}"
    if "scaling_factor" in tensors and torch.allclose(tensors["scaling_factor"], torch.ones(1, dtype=torch.float64)):
        del tensors["scaling_factor"]
    d_in, d_sae = tensors["W_enc"].shape
    cfg = {"architecture": "jumprelu", "d_in": int(d_in), "d_sae": int(d_sae), "activation_fn": "relu",
           "apply_b_dec_to_input": False, "normalize_activations": "none", "hook_name": hook,
           "model_name": model, "finetuning_scaling_factor": "scaling_factor" in tensors,
           "converted_from": f"gemma_scope params.npz ({repo_id}/{folder})"}
    return cfg, tensors
