"""Export one stage of a featurewire stack in SAELens' own on-disk format (cfg.json + sae_weights.safetensors),
so the SAE can be loaded with `SAE.load_from_disk` (or re-imported with `featurewire-train import --from saelens`).

Why the weights change. A stage encodes x = s·h, where h is the raw activation and s its `input_scale`, and maps
its reconstruction back by dividing by s. SAELens has no constant input scale at inference: its
`expected_average_only_in` normalisation is only applied while training, and its own loader folds the factor into
the weights (`fold_activation_norm_scaling_factor`). We fold it the same way, exactly, in float64:

    W_enc' = s·W_enc    b_dec' = b_dec / s    W_dec' = W_dec / s    (b_enc, thresholds, r_mag, b_mag unchanged)

so (h − b_dec')·W_enc' + b_enc = (s·h − b_dec)·W_enc + b_enc: SAELens computes the same pre-activations, hence the
same codes as featurewire, and z·W_dec' + b_dec' = (z·W_dec + b_dec)/s is our reconstruction on raw activations.
`normalize_activations` is "none". The decoder rows then have norm 1/s (not 1): SAELens's TopK ranks raw
pre-activations (`rescale_acts_by_decoder_norm` false), so equal norms change nothing.

Architectures: relu → "standard", topk → "topk" (k), jumprelu → "jumprelu" (θ clamped at our 1e-6 floor), gated →
"gated" (b_enc is SAELens's b_gate), batchtopk → "jumprelu" with every threshold equal to our inference threshold
(as SAELens itself saves BatchTopK SAEs; exact because both fire on π > θ ≥ 0). SA-GSAE (signed codes, two-sided
gate) and residual (ReSAE) stages, which read an affine residual of another stage, have no SAELens equivalent and
are refused. cfg.json follows SAELens ≥ 6 (hook and dataset fields under `metadata`) and repeats them at the top
level, with `hook_layer` and `activation_fn_str`, for SAELens 3–5 readers.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from core import __version__
from core.stack.reader import LoadedStack, LoadedStage, read_stack
from trainer.interop.importers import CANONICAL_HOOKPOINT

SAELENS_FORMAT_VERSION = "6.0.0"  # cfg.json layout written; SAELens treats older versions as pre-6 configs
FILES = ("cfg.json", "sae_weights.safetensors")


class SAELensExportError(ValueError):
    """A stage that cannot be written in SAELens' format; the message says why."""


@dataclass
class SAELensExport:
    out_dir: Path
    stage: str
    architecture: str  # SAELens architecture written
    input_scale: float  # folded into the weights
    cfg: dict[str, Any]


def find_stage(stack: LoadedStack, name: str | None) -> LoadedStage:
    """The stage called `name`; without a name, the only stage of a one-stage stack."""
    names = [s.name for s in stack.stages]
    if name is None and len(names) == 1:
        return stack.stages[0]
    if name is None or name not in names:
        what = "name a stage with --stage" if name is None else f"stack {stack.name!r} has no stage {name!r}"
        raise SAELensExportError(f"{what}; stages: {', '.join(names)}")
    return stack.stage(name)


def check_exportable(stage: LoadedStage) -> None:
    """Refuse stages SAELens cannot express, saying why."""
    if stage.residual_of is not None:
        raise SAELensExportError(
            f"stage {stage.name!r} is a residual (ReSAE) stage: it encodes s·(h − A·h_prev − c), the residual of "
            f"stage {stage.residual_of}'s activation after an affine map, and SAELens SAEs read one hook's "
            "activation only; export a plain stage instead")
    if stage.sae.cfg.architecture == "sa_gsae" or stage.signed:
        raise SAELensExportError(
            f"stage {stage.name!r} is an SA-GSAE: its codes are signed (a two-sided gate with thresholds θ⁺/θ⁻ and a "
            "signed magnitude), and no SAELens architecture has signed codes, so it cannot be exported exactly")
    if not CANONICAL_HOOKPOINT.match(stage.hookpoint):  # also what `import --from saelens` accepts
        raise SAELensExportError(f"stage {stage.name!r} hooks {stage.hookpoint!r}, which is not a TransformerLens "
                                 "hook name of the form blocks.N.hook_resid_pre|hook_resid_post|hook_attn_out|"
                                 "hook_mlp_out")


def saelens_weights(stage: LoadedStage) -> tuple[str, dict[str, Tensor], dict[str, Any]]:
    """(SAELens architecture, its state dict in fp32 with input_scale folded in, architecture cfg fields)."""
    check_exportable(stage)
    sae, s = stage.sae, float(stage.input_scale)
    p = {k: v.detach().to("cpu", torch.float64) for k, v in sae.state_dict().items()}
    out = {"W_enc": p["W_enc"] * s,  # (d_in, d_sae)
           "W_dec": p["W_dec"] / s,  # (d_sae, d_in)
           "b_dec": p["b_dec"] / s}  # (d_in,)
    kind, fields = sae.cfg.architecture, {}
    if kind == "relu":
        architecture, out["b_enc"] = "standard", p["b_enc"]  # (d_sae,)
    elif kind == "topk":
        architecture, out["b_enc"] = "topk", p["b_enc"]
        fields = {"k": sae.cfg.k, "rescale_acts_by_decoder_norm": False}
    elif kind == "jumprelu":
        architecture, out["b_enc"] = "jumprelu", p["b_enc"]
        out["threshold"] = sae.effective_threshold().detach().to("cpu", torch.float64)  # (d_sae,)
    elif kind == "batchtopk":  # SAELens saves BatchTopK as JumpReLU with one threshold for every latent
        architecture, out["b_enc"] = "jumprelu", p["b_enc"]
        out["threshold"] = p["threshold"].clamp_min(0).expand(sae.d_sae).clone()  # (d_sae,)
    elif kind == "gated":
        architecture = "gated"
        out |= {"b_gate": p["b_enc"], "r_mag": p["r_mag"], "b_mag": p["b_mag"]}  # each (d_sae,)
    else:
        raise SAELensExportError(f"stage {stage.name!r}: architecture {kind!r} has no SAELens equivalent")
    return architecture, {k: v.to(torch.float32).contiguous() for k, v in out.items()}, fields


def _training_context(stage: LoadedStage) -> tuple[int | None, str | None]:
    """(context size, dataset) the stage was trained on, from its training record (or its import's source)."""
    config = stage.training.get("config") or {}
    if config:
        return (config.get("activations") or {}).get("context_length"), (config.get("corpus") or {}).get("spec")
    source = (stage.training.get("imported") or {}).get("source_config") or {}
    meta = source.get("metadata") or {}
    return source.get("context_size", meta.get("context_size")), source.get("dataset_path", meta.get("dataset_path"))


def saelens_cfg(stack: LoadedStack, stage: LoadedStage, architecture: str, fields: dict[str, Any],
                model_name: str | None = None) -> dict[str, Any]:
    """cfg.json: SAELens ≥ 6 fields, `metadata`, and the top-level copies older SAELens releases require."""
    context_size, dataset = _training_context(stage)
    layer = int(stage.hookpoint.split(".")[1])  # blocks.N.…, checked by saelens_weights
    model = model_name or stack.identity.name
    llm = {"model_name": model, "hook_name": stage.hookpoint, "hook_head_index": None, "context_size": context_size,
           "prepend_bos": True, "dataset_path": dataset}
    provenance = {"exported_by": f"featurewire-trainer {__version__}", "stack": stack.name,
                  "stack_digest": stack.digest, "stage": stage.name, "stage_index": stage.index,
                  "architecture": stage.sae.cfg.architecture, "input_scale": stage.input_scale,
                  "input_scale_folded": True, "host_model": asdict(stack.identity)}
    legacy = {"hook_layer": layer, "activation_fn_str": "topk" if architecture == "topk" else "relu",
              "activation_fn_kwargs": {"k": fields["k"]} if architecture == "topk" else {},
              "finetuning_scaling_factor": False, "dataset_trust_remote_code": True, "sae_lens_training_version": None}
    return {"architecture": architecture, "d_in": stage.sae.d_in, "d_sae": stage.sae.d_sae, "dtype": "float32",
            "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
            "reshape_activations": "none", **fields, **llm, **legacy,
            "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
                         "model_class_name": "HookedTransformer", **llm, "featurewire": provenance}}


def export_saelens(stack_dir: str | Path, stage_name: str | None, out_dir: str | Path, *,
                   model_name: str | None = None, overwrite: bool = False) -> SAELensExport:
    """`featurewire-train export --to saelens`: write one stage of a verified stack as a SAELens SAE."""
    stack = read_stack(stack_dir)
    stage = find_stage(stack, stage_name)
    architecture, weights, fields = saelens_weights(stage)
    cfg = saelens_cfg(stack, stage, architecture, fields, model_name)
    out = Path(out_dir)
    existing = [name for name in FILES if (out / name).exists()]
    if existing and not overwrite:
        raise SAELensExportError(f"{out} already holds {', '.join(existing)}; pass --overwrite to replace them")
    out.mkdir(parents=True, exist_ok=True)
    tmp = {name: out / f".{name}.{os.getpid()}.tmp" for name in FILES}
    try:  # both files are complete before either replaces what was there
        save_file(weights, str(tmp["sae_weights.safetensors"]), metadata={"format": "pt"})
        tmp["cfg.json"].write_text(json.dumps(cfg, indent=2) + "\n")
        for name in FILES:
            os.replace(tmp[name], out / name)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    return SAELensExport(out, stage.name, architecture, stage.input_scale, cfg)
