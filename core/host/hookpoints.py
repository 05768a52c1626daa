"""Canonical hookpoint names (TransformerLens/SAELens style) resolved to HF modules per architecture.

A hookpoint is read or written at a module boundary:
- `blocks.{i}.hook_resid_pre`  : the input of decoder layer i (a forward *pre*-hook on the layer)
- `blocks.{i}.hook_resid_post` : the output of decoder layer i
- `blocks.{i}.hook_attn_out`   : the attention contribution that is added to the residual stream
- `blocks.{i}.hook_mlp_out`    : the MLP contribution that is added to the residual stream
For Gemma 2/3 the contributions are taken after the post-norms, since those are what is added.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from torch import nn

from core.errors import NotFound, Unsupported


class HookKind(StrEnum):
    """The four hookpoints of a decoder block, in forward order."""

    RESID_PRE = "hook_resid_pre"
    ATTN_OUT = "hook_attn_out"
    MLP_OUT = "hook_mlp_out"
    RESID_POST = "hook_resid_post"


KIND_ORDER = {kind: rank for rank, kind in enumerate(HookKind)}


@dataclass(frozen=True)
class BlockLayout:
    """Where a family keeps its decoder layers and, inside a layer, its attn/MLP outputs."""

    layers: str  # path from the CausalLM root to the ModuleList of decoder layers
    attn_out: str  # path inside a layer to the module whose output is the attention contribution
    mlp_out: str  # path inside a layer to the module whose output is the MLP contribution


_GEMMA_POSTNORM = BlockLayout("model.layers", "post_attention_layernorm", "post_feedforward_layernorm")
_LLAMA_STYLE = BlockLayout("model.layers", "self_attn.o_proj", "mlp")

LAYOUTS: dict[str, BlockLayout] = {
    "gemma3_text": _GEMMA_POSTNORM,
    "gemma2": _GEMMA_POSTNORM,
    "gemma": _LLAMA_STYLE,
    "llama": _LLAMA_STYLE,
    "mistral": _LLAMA_STYLE,
    "qwen2": _LLAMA_STYLE,
    "qwen3": _LLAMA_STYLE,
    "gpt_neox": BlockLayout("gpt_neox.layers", "attention.dense", "mlp"),
    "gpt2": BlockLayout("transformer.h", "attn.c_proj", "mlp"),
}

SUPPORTED_ARCHITECTURES = tuple(sorted(LAYOUTS))

_NAME = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_attn_out|hook_mlp_out)$")


@dataclass(frozen=True)
class Hookpoint:
    """One resolved hookpoint: its canonical name, where it sits and how wide it is."""

    name: str
    layer: int
    kind: HookKind
    module_path: str  # HF module path from the CausalLM root
    is_input: bool  # True: read/write the module's input (pre-hook); False: its output
    dim: int

    @property
    def order(self) -> tuple[int, int]:
        """Sort key in forward order."""
        return (self.layer, KIND_ORDER[self.kind])


def hookpoint_name(layer: int, kind: HookKind) -> str:
    return f"blocks.{layer}.{kind.value}"


def layout_for(model_type: str) -> BlockLayout:
    """The module layout of a model family, or a clear error naming the supported ones."""
    try:
        return LAYOUTS[model_type]
    except KeyError:
        raise Unsupported(
            f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        ) from None


class HookpointRegistry:
    """All hookpoints of one loaded model, keyed by canonical name, in forward order."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        config = model.config
        self.model_type: str = config.model_type
        layout = layout_for(self.model_type)
        self.layers: nn.ModuleList = model.get_submodule(layout.layers)  # the decoder layers, in order
        self.num_layers = len(self.layers)
        self.d_model: int = config.hidden_size
        self._points: dict[str, Hookpoint] = {}
        for i in range(self.num_layers):
            base = f"{layout.layers}.{i}"
            paths = {
                HookKind.RESID_PRE: (base, True),
                HookKind.ATTN_OUT: (f"{base}.{layout.attn_out}", False),
                HookKind.MLP_OUT: (f"{base}.{layout.mlp_out}", False),
                HookKind.RESID_POST: (base, False),
            }
            for kind, (path, is_input) in paths.items():
                model.get_submodule(path)  # fail loudly now if the layout is wrong for this model
                name = hookpoint_name(i, kind)
                self._points[name] = Hookpoint(name, i, kind, path, is_input, self.d_model)

    def __len__(self) -> int:
        return len(self._points)

    def __contains__(self, name: object) -> bool:
        return name in self._points

    def __iter__(self):
        return iter(self._points.values())

    def names(self) -> list[str]:
        """Every hookpoint name in forward order."""
        return list(self._points)

    def get(self, name: str) -> Hookpoint:
        """Resolve a canonical name; unknown names get an error that says what is valid."""
        point = self._points.get(name)
        if point is not None:
            return point
        last = self.num_layers - 1
        valid = f"blocks.{{0..{last}}}.{{{', '.join(k.value for k in HookKind)}}}"
        match = _NAME.match(name)
        if match and int(match.group(1)) > last:
            raise NotFound(f"unknown hookpoint {name!r}: layer {match.group(1)} > {last}; valid: {valid}")
        raise NotFound(f"unknown hookpoint {name!r}; valid names are {valid}")

    def resolve(self, names: list[str] | tuple[str, ...]) -> list[Hookpoint]:
        """Resolve several names, deduplicated, in forward order."""
        points = {name: self.get(name) for name in names}
        return sorted(points.values(), key=lambda p: p.order)

    def module(self, point: Hookpoint) -> nn.Module:
        return self._model.get_submodule(point.module_path)
