"""Load a host model by name: `default`, a smoke model, a local safetensors directory or a .gguf file.

Everything is offline: local paths only (`local_files_only=True`), safetensors only (a pickled
`pytorch_model.bin` is refused, never unpickled).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from core.config import ModelConfig
from core.errors import FailedPrecondition, NotFound
from core.host.devices import dtype_name, resolve_device, resolve_dtype
from core.host.gguf_cache import cached_gguf_dir, default_model_dir
from core.host.hookpoints import SUPPORTED_ARCHITECTURES, layout_for
from core.host.host_model import HostModel
from core.host.smoke_models import SMOKE_MODEL_NAMES, build_smoke_model

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
MODEL_CHOICES = (
    f"{DEFAULT_MODEL!r} (embedded Gemma 3 270M), "
    + ", ".join(repr(n) for n in SMOKE_MODEL_NAMES)
    + ", a directory with config.json + *.safetensors + a tokenizer, or a .gguf file"
)


def load_host_model(config: ModelConfig) -> HostModel:
    """Load and place the host model that `config` names; errors say what is accepted."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    started = time.perf_counter()
    name = config.name
    if name in SMOKE_MODEL_NAMES:
        model, tokenizer = build_smoke_model(name)
    elif name == DEFAULT_MODEL:
        model, tokenizer = _load_directory(default_model_dir(config.cache_dir), dtype)
    else:
        path = Path(name).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            model, tokenizer = _load_directory(cached_gguf_dir(path, config.cache_dir), dtype)
        elif path.is_dir():
            model, tokenizer = _load_directory(path, dtype)
        else:
            raise NotFound(f"unknown model {name!r}: not a directory or .gguf file; use {MODEL_CHOICES}")
    model = model.to(device=device, dtype=dtype)
    host = HostModel(name, model, tokenizer)
    logger.info("loaded %s (%s, %s, %s) in %.1fs", name, host.summary().model_type, device, dtype_name(dtype),
                time.perf_counter() - started)
    return host


def _load_directory(path: Path, dtype: torch.dtype):
    """A HF model directory: check what is there before transformers sees it, for clear errors."""
    if not (path / "config.json").is_file():
        raise NotFound(f"model directory {str(path)!r} has no config.json; use {MODEL_CHOICES}")
    if not any(path.glob("*.safetensors")):
        pickled = [p.name for p in path.glob("*.bin")]
        hint = f" (found {', '.join(pickled)}: pickled weights are never loaded)" if pickled else ""
        raise FailedPrecondition(f"model directory {str(path)!r} has no *.safetensors weights{hint}")
    model_type = AutoConfig.from_pretrained(path, local_files_only=True).model_type
    layout_for(model_type)  # unsupported architecture: fail before loading any weights
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


__all__ = ["DEFAULT_MODEL", "MODEL_CHOICES", "SUPPORTED_ARCHITECTURES", "load_host_model"]
