"""Import SAEs saved by SAELens or EleutherAI's sparsify as featurewire SAEs, without either library.

Both formats are read from their files alone (JSON config + safetensors, never pickle) and mapped onto
our conventions, in float64, then stored as fp32:

- Encoder input. Our encoders read x − b_dec. SAELens subtracts b_dec only when `apply_b_dec_to_input`
  is true; when it is false the library's pre-activation is x·W + b = (x − b_dec)·W + (b + b_dec·W), so
  the bias becomes b_enc' = b_enc + b_dec·W_enc (gated: also b_mag' = b_mag + b_dec·(W_enc ⊙ exp(r_mag))).
- Unit decoder rows. Ours are unit norm; the libraries' need not be. With n_i = ‖d_i‖ we store
  d_i' = d_i / n_i and scale latent i's encoder column, encoder bias, b_mag and threshold by n_i
  (r_mag is unchanged: it multiplies the already-scaled column). Every activation used here is
  positively homogeneous, so our code is z_i' = n_i·z_i and z_i'·d_i' = z_i·d_i: reconstructions are
  unchanged and codes change by the per-latent factor `code_scale` (ImportedSAE.code_scale, also
  stored in the stage as the extra tensor `source_code_scale`). JumpReLU thresholds are clamped at 0
  first, which is exact because SAELens applies ReLU before the jump.
- TopK ranks pre-activations, and scaling latents by different n_i would change which k win. SAELens
  TopK SAEs with `rescale_acts_by_decoder_norm` already rank n_i·pre, so they map exactly with
  code_scale = 1. Otherwise (legacy SAELens TopK, sparsify) the decoder norms must be equal (sparsify
  keeps them at 1), and an import with unequal norms is refused rather than silently re-ranked.
The contract: our `encode` equals the library's encode times `code_scale`, and `decode(encode(x))`
equals the library's reconstruction. Per-token input normalisation (SAELens `constant_norm_rescale`,
`layer_norm`), hook_z reshaping, transcoders and skip connections have no featurewire equivalent and
are refused; `expected_average_only_in` needs the SAE's scaling factor, passed as `input_scale`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from core.sae.base import SAEConfig, SparseAutoencoder
from core.sae.registry import build_sae
from core.stack.writer import StageSpec

CANONICAL_HOOKPOINT = re.compile(r"^blocks\.\d+\.(hook_resid_pre|hook_resid_post|hook_attn_out|hook_mlp_out)$")
UNIFORM_NORM_TOLERANCE = 1e-5  # relative spread of decoder norms under which TopK ranking is unaffected


class SAEImportError(ValueError):
    """A source SAE that cannot be imported exactly; the message says why and what to do."""


@dataclass
class ImportedSAE:
    sae: SparseAutoencoder  # eval mode, fp32, CPU
    hookpoint: str | None  # canonical hookpoint, when the caller gave one or the source named one
    input_scale: float
    code_scale: Tensor  # (d_sae,): our z = library z · code_scale
    source: str  # "saelens" or "sparsify"
    source_config: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    model_name: str | None = None  # the host model the source says it was trained on, when it says

    def stage_spec(self, hookpoint: str | None = None, *, name: str | None = None) -> StageSpec:
        """A stack stage for this SAE; `hookpoint` overrides the one found at import."""
        point = _hookpoint(hookpoint or self.hookpoint, None)
        if point is None:
            raise SAEImportError("no hookpoint known for this SAE; pass one such as blocks.6.hook_resid_post")
        provenance = {"source": self.source, "source_config": self.source_config, "notes": self.notes}
        return StageSpec(self.sae, point, self.input_scale, name=name, training={"imported": provenance},
                         extra_tensors={"source_code_scale": self.code_scale})


def _hookpoint(given: str | None, default: str | None) -> str | None:
    if given is not None and not CANONICAL_HOOKPOINT.match(given):
        raise SAEImportError(f"hookpoint {given!r} is not canonical; use blocks.N.hook_resid_pre|hook_resid_post|"
                             "hook_attn_out|hook_mlp_out")
    return given or (default if default and CANONICAL_HOOKPOINT.match(default) else None)


def _read(src: Path, config_name: str, weights_name: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    cfg_path, weights_path = src / config_name, src / weights_name
    if not cfg_path.is_file() or not weights_path.is_file():
        raise SAEImportError(f"{src} must hold {config_name} and {weights_name}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SAEImportError(f"{cfg_path} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise SAEImportError(f"{cfg_path} must hold a JSON object")
    return cfg, {k: v.to(torch.float64) for k, v in load_file(str(weights_path)).items()}


def _check_shapes(tensors: dict[str, Tensor], want: dict[str, tuple[int, ...]], source: str) -> None:
    problems = [f"missing {k}" for k in want if k not in tensors]
    problems += [f"unexpected {k} (no featurewire equivalent)" for k in tensors if k not in want]
    problems += [f"{k} is {tuple(tensors[k].shape)}, expected {s}" for k, s in want.items()
                 if k in tensors and tuple(tensors[k].shape) != s]
    if problems:
        raise SAEImportError(f"{source} weights do not match the config: {'; '.join(problems)}")


def _assemble(
    architecture: str, p: dict[str, Tensor], *, k: int | None, b_dec_in_encoder: bool, ranks_unit_decoder: bool
) -> tuple[SparseAutoencoder, Tensor, list[str]]:
    """Map library parameters p (float64: W_enc, b_enc, W_dec, b_dec [, threshold | r_mag, b_mag]) onto
    our conventions (module docstring); returns the SAE, the per-latent code scale and notes."""
    p, notes = dict(p), []
    if not b_dec_in_encoder:
        p["b_enc"] = p["b_enc"] + p["b_dec"] @ p["W_enc"]
        if architecture == "gated":
            p["b_mag"] = p["b_mag"] + p["b_dec"] @ (p["W_enc"] * p["r_mag"].exp())
        notes.append("b_dec folded into the encoder biases (the source encodes x, not x − b_dec)")
    norms = p["W_dec"].norm(dim=1)  # (d_sae,)
    if bool((norms <= 1e-12).any()):
        raise SAEImportError(f"{int((norms <= 1e-12).sum())} latents have a zero decoder row; cannot normalise")
    spread = float((norms.max() - norms.min()) / norms.max())
    if architecture == "topk" and not ranks_unit_decoder and spread > UNIFORM_NORM_TOLERANCE:
        raise SAEImportError(
            f"this TopK SAE ranks raw pre-activations but its decoder norms differ (relative spread {spread:.2e}); "
            "normalising them would change which latents win, so it cannot be imported exactly")
    p["W_dec"] = p["W_dec"] / norms[:, None]
    p["W_enc"], p["b_enc"] = p["W_enc"] * norms, p["b_enc"] * norms
    if "b_mag" in p:
        p["b_mag"] = p["b_mag"] * norms
    if "threshold" in p:
        p["threshold"] = p["threshold"].clamp_min(0) * norms
    code_scale = torch.ones_like(norms) if ranks_unit_decoder else norms
    if spread > UNIFORM_NORM_TOLERANCE:
        notes.append(f"decoder rows normalised (norms {float(norms.min()):.4g}–{float(norms.max()):.4g}); "
                     "codes scale by code_scale")
    d_sae, d_in = p["W_dec"].shape
    cfg = SAEConfig(architecture, d_in=d_in, d_sae=d_sae, k=k if k is not None else min(32, d_sae))
    with torch.random.fork_rng(devices=[]):
        sae = build_sae(cfg)
    sae.load_state_dict({name: t.to(torch.float32).contiguous() for name, t in p.items()}, strict=True)
    return sae.requires_grad_(False).eval(), code_scale.to(torch.float32), notes


def _saelens_kind(cfg: dict[str, Any]) -> tuple[str, int | None]:
    architecture = cfg.get("architecture", "standard")
    activation = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
    if architecture == "topk" or (architecture == "standard" and activation == "topk"):
        k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
        if type(k) is not int or k < 1:
            raise SAEImportError(f"TopK SAE without a valid k in cfg.json (got {k!r})")
        return "topk", k
    kinds = {"standard": "relu", "jumprelu": "jumprelu", "gated": "gated"}
    if architecture not in kinds or activation != "relu":
        raise SAEImportError(f"SAELens architecture {architecture!r} with activation {activation!r} has no "
                             "featurewire equivalent; supported: standard, topk, jumprelu, gated (ReLU-based)")
    return kinds[architecture], None


def import_saelens(
    src_dir: str | Path, *, hookpoint: str | None = None, input_scale: float | None = None
) -> ImportedSAE:
    """Import an SAE saved by SAELens (`cfg.json` + `sae_weights.safetensors`, any 3.x–6.x layout)."""
    cfg, tensors = _read(Path(src_dir), "cfg.json", "sae_weights.safetensors")
    return saelens_from_parts(cfg, tensors, hookpoint=hookpoint, input_scale=input_scale)


def saelens_from_parts(
    cfg: dict[str, Any], tensors: dict[str, Tensor], *, hookpoint: str | None = None, input_scale: float | None = None
) -> ImportedSAE:
    """Import an SAE from a SAELens-style config and its float64 tensors (also used for formats that SAELens
    converts into its own, such as Gemma Scope's params.npz)."""
    meta = cfg.get("metadata") or cfg.get("meta") or {}
    hook_name = cfg.get("hook_name") or cfg.get("hook_point") or meta.get("hook_name")
    if cfg.get("reshape_activations", "none") not in (None, "none") or str(hook_name).endswith("hook_z") \
            or (cfg.get("hook_head_index") or meta.get("hook_head_index")) is not None:
        raise SAEImportError("attention hook_z / per-head SAEs are not supported (featurewire hooks d_model vectors)")
    norm = cfg.get("normalize_activations") or "none"
    norm = {True: "expected_average_only_in", False: "none"}.get(norm, norm)
    if norm not in ("none", "expected_average_only_in"):
        raise SAEImportError(f"normalize_activations={norm!r} normalises each token; featurewire stages only "
                             "scale by one constant, so this SAE cannot be served exactly")
    if norm == "expected_average_only_in" and input_scale is None:
        raise SAEImportError("this SAE expects inputs scaled by its norm scaling factor (expected_average_only_in); "
                             "pass that factor as input_scale")
    scale = 1.0 if input_scale is None else float(input_scale)
    if not math.isfinite(scale) or scale <= 0:
        raise SAEImportError(f"input_scale must be finite and > 0, got {input_scale!r}")
    kind, k = _saelens_kind(cfg)
    rescaled = bool(cfg.get("rescale_acts_by_decoder_norm", False))
    if rescaled and kind != "topk":
        raise SAEImportError("rescale_acts_by_decoder_norm is only understood for SAELens TopK SAEs")
    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    if type(d_in) is not int or type(d_sae) is not int:
        raise SAEImportError(f"cfg.json needs integer d_in and d_sae, got {d_in!r} and {d_sae!r}")
    if "log_threshold" in tensors:  # a JumpReLU training checkpoint stores log θ
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    if "threshold" in tensors and tensors["threshold"].dim() == 0:
        tensors["threshold"] = tensors["threshold"].expand(d_sae).clone()
    want = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    want |= {"gated": {"b_gate": (d_sae,), "r_mag": (d_sae,), "b_mag": (d_sae,)},
             "jumprelu": {"b_enc": (d_sae,), "threshold": (d_sae,)}}.get(kind, {"b_enc": (d_sae,)})
    want |= {name: (d_sae,) for name in ("finetuning_scaling_factor", "scaling_factor") if name in tensors}
    _check_shapes(tensors, want, "SAELens")
    if kind == "gated":
        tensors["b_enc"] = tensors.pop("b_gate")
    for name in ("finetuning_scaling_factor", "scaling_factor"):  # SAELens decodes (z ⊙ s)·W_dec: fold s in
        if name in tensors:
            tensors["W_dec"] = tensors["W_dec"] * tensors.pop(name)[:, None]
    sae, code_scale, notes = _assemble(kind, tensors, k=k, ranks_unit_decoder=rescaled,
                                       b_dec_in_encoder=bool(cfg.get("apply_b_dec_to_input", True)))
    model_name = cfg.get("model_name") or meta.get("model_name")
    return ImportedSAE(sae, _hookpoint(hookpoint, hook_name), scale, code_scale, "saelens", cfg, notes,
                       model_name=model_name if isinstance(model_name, str) else None)


def import_sparsify(src_dir: str | Path, *, hookpoint: str | None = None, input_scale: float = 1.0) -> ImportedSAE:
    """Import one hookpoint's SAE saved by EleutherAI sparsify (`cfg.json` + `sae.safetensors`):
    z = TopK_k(ReLU(encoder(x − b_dec))), x̂ = z·W_dec + b_dec. A folder named `layers.N` (the output
    of decoder layer N) defaults the hookpoint to blocks.N.hook_resid_post."""
    src = Path(src_dir)
    cfg, tensors = _read(src, "cfg.json", "sae.safetensors")
    if cfg.get("activation", "topk") != "topk":
        raise SAEImportError(f"sparsify activation {cfg.get('activation')!r} is not supported (only topk)")
    for flag in ("transcode", "skip_connection", "embed_skip", "gram_lookup"):
        if cfg.get(flag):
            raise SAEImportError(f"sparsify {flag}=true has no featurewire equivalent")
    d_in, k = cfg.get("d_in"), cfg.get("k")
    if type(d_in) is not int or type(k) is not int or "encoder.weight" not in tensors:
        raise SAEImportError("sparsify cfg.json needs integer d_in and k, and the weights an encoder.weight")
    d_sae = tensors["encoder.weight"].shape[0]
    if d_sae != (cfg.get("num_latents") or d_in * cfg.get("expansion_factor", 32)):
        raise SAEImportError(f"encoder.weight has {d_sae} latents, cfg.json implies another number")
    _check_shapes(tensors, {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in),
                            "b_dec": (d_in,)}, "sparsify")
    if not math.isfinite(input_scale) or input_scale <= 0:
        raise SAEImportError(f"input_scale must be finite and > 0, got {input_scale!r}")
    params = {"W_enc": tensors["encoder.weight"].T, "b_enc": tensors["encoder.bias"], "W_dec": tensors["W_dec"],
              "b_dec": tensors["b_dec"]}
    sae, code_scale, notes = _assemble("topk", params, k=k, b_dec_in_encoder=True, ranks_unit_decoder=False)
    layer = re.fullmatch(r"(?:.*\.)?layers\.(\d+)", src.resolve().name)
    default = f"blocks.{layer.group(1)}.hook_resid_post" if layer else None
    return ImportedSAE(sae, _hookpoint(hookpoint, default), float(input_scale), code_scale, "sparsify", cfg, notes,
                       model_name=_sparsify_run_model(src))


def _sparsify_run_model(src: Path) -> str | None:
    """sparsify writes its run config (with the model's name) as config.json next to the layer folders."""
    try:
        model = json.loads((src.resolve().parent / "config.json").read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return model if isinstance(model, str) else None

