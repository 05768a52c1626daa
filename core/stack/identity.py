"""Which host model a stack belongs to: a cheap, stable identity checked when a stack is loaded.

`model_fingerprint` hashes the architecture-relevant config fields (names, dtypes and runtime flags
excluded); `weights_fingerprint` hashes the first embedding rows rounded to bf16, so fp32 and bf16
copies of one checkpoint agree while a fine-tune differs. Imports only torch and the standard library
(the service reads it through `core.stack.reader`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from core.stack.manifest import StackError

_CONFIG_FIELDS: dict[str, tuple[str, ...]] = {  # canonical key -> HF config attributes, first one set wins
    "model_type": ("model_type",), "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"), "vocab_size": ("vocab_size",),
    "num_attention_heads": ("num_attention_heads", "n_head"), "num_key_value_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",), "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim"),
    "activation": ("hidden_activation", "hidden_act", "activation_function"),
    "norm_eps": ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"),
    "tie_word_embeddings": ("tie_word_embeddings",), "parallel_residual": ("use_parallel_residual", "parallel_attn"),
    "sliding_window": ("sliding_window",), "layer_types": ("layer_types",),
    "query_pre_attn_scalar": ("query_pre_attn_scalar",), "final_logit_softcapping": ("final_logit_softcapping",),
    "attn_logit_softcapping": ("attn_logit_softcapping",),
}


def _config_value(config: Any, key: str) -> Any:
    return next((getattr(config, n) for n in _CONFIG_FIELDS[key] if getattr(config, n, None) is not None), None)


def _canonical(value: Any) -> Any:
    if isinstance(value, float):  # 10000 and 10000.0 agree; repr is exact and stable
        return int(value) if value.is_integer() else repr(value)
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    return value if value is None or isinstance(value, bool | int | str) else str(value)


def _rope_fields(config: Any) -> dict[str, Any]:
    """RoPE bases, types and rotary fraction, alike whether a transformers release keeps them at the top
    level (rope_theta, rope_local_base_freq, rotary_emb_base, rotary_pct) or in `rope_parameters`."""
    params = getattr(config, "rope_parameters", None) or {}
    groups = list(params.values()) if params and all(isinstance(v, Mapping) for v in params.values()) else [params]
    thetas = {getattr(config, a, None) for a in ("rope_theta", "rope_local_base_freq", "rotary_emb_base")}
    thetas = sorted(float(t) for t in thetas | {g.get("rope_theta") for g in groups} if t is not None)
    fractions = [getattr(config, "rotary_pct", None), getattr(config, "partial_rotary_factor", None)]
    fractions += [g.get("partial_rotary_factor") for g in groups]
    out: dict[str, Any] = {"rope_types": sorted({g.get("rope_type") or "default" for g in groups})}
    out.update({"rope_thetas": thetas} if thetas else {})
    fraction = next((f for f in fractions if f is not None), None)
    return out | ({"partial_rotary_factor": float(fraction)} if fraction is not None else {})


def model_fingerprint(model: Any) -> str:
    """sha256 of a canonical JSON of the architecture-relevant fields of `model.config` (shapes, norms,
    activation, attention layout, RoPE). Names, dtypes, token ids, runtime flags and the transformers
    version are left out, so the same architecture loaded another way fingerprints the same."""
    config = model.config
    fields_ = {k: v for k in _CONFIG_FIELDS if (v := _config_value(config, k)) is not None} | _rope_fields(config)
    return hashlib.sha256(json.dumps(_canonical(fields_), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def weights_fingerprint(model: Any, rows: int = 1024) -> str | None:
    """sha256 of the first `rows` rows of the input embedding rounded to bfloat16 (about 1 MB to hash):
    tells a base model from its fine-tune. fp32 and bf16 copies of one checkpoint agree (an fp16 copy
    generally does not). None when the model has no readable input embedding."""
    get = getattr(model, "get_input_embeddings", None)
    weight = getattr(get(), "weight", None) if callable(get) else None
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return None
    block = weight.detach()[:rows].to(device="cpu", dtype=torch.bfloat16).contiguous()
    digest = hashlib.sha256(f"{tuple(block.shape)}:".encode())
    digest.update(block.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class HostModelIdentity:
    """Which host model a stack belongs to. `name` is informative only; the other fields must match."""

    name: str
    model_type: str
    num_layers: int
    d_model: int
    vocab_size: int
    fingerprint: str
    weights_fingerprint: str | None = None

    @classmethod
    def from_model(cls, model: Any, name: str, *, weights: bool = True) -> HostModelIdentity:
        """The identity of a loaded HF causal LM (anything with a HF-style `.config`)."""
        c = model.config
        return cls(name, str(c.model_type), int(_config_value(c, "num_layers")), int(_config_value(c, "hidden_size")),
                   int(c.vocab_size), model_fingerprint(model), weights_fingerprint(model) if weights else None)

    @classmethod
    def from_dict(cls, data: Any) -> HostModelIdentity:
        kinds = {"name": str, "model_type": str, "num_layers": int, "d_model": int, "vocab_size": int,
                 "fingerprint": str, "weights_fingerprint": (str, type(None))}
        if not isinstance(data, Mapping) or any(
            not isinstance(data.get(k), kind) or isinstance(data.get(k), bool) for k, kind in kinds.items()
        ):
            raise StackError(f"stack.json: host_model must be an object with {', '.join(kinds)}")
        return cls(**{k: data.get(k) for k in kinds})

    def describe(self) -> str:
        weights = f", weights {self.weights_fingerprint[:12]}…" if self.weights_fingerprint else ""
        return (f"{self.model_type} d_model={self.d_model} layers={self.num_layers} vocab={self.vocab_size} "
                f"(fingerprint {self.fingerprint[:12]}…{weights})")

    def differences(self, other: HostModelIdentity) -> list[str]:
        """Fields that differ; the weights fingerprints count only when both sides have one."""
        out = [k for k in ("model_type", "d_model", "num_layers", "vocab_size", "fingerprint")
               if getattr(self, k) != getattr(other, k)]
        w1, w2 = self.weights_fingerprint, other.weights_fingerprint
        return out + (["weights_fingerprint"] if w1 and w2 and w1 != w2 else [])
