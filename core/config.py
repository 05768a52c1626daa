"""Host-model settings shared by `featurewire-train` and `featurewire-serve`: one frozen dataclass, one env path.

No module reads the environment at import: each CLI calls `ModelConfig.from_env(os.environ, **flags)`
(defaults, then FEATUREWIRE_MODEL/DEVICE/DTYPE/CACHE, then flags).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

ENV_PREFIX = "FEATUREWIRE_"


def default_cache_dir(environ: Mapping[str, str]) -> Path:
    """`FEATUREWIRE_CACHE`, else `~/.cache/featurewire`."""
    value = environ.get(f"{ENV_PREFIX}CACHE")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "featurewire"


@dataclass(frozen=True)
class ModelConfig:
    """Which host model to load, and where."""

    name: str = "default"
    """`default` (embedded Gemma 3 270M), `tiny-random`, `tiny-random-neox`, a directory or a .gguf file."""
    device: str = "auto"
    """`auto` (cuda when available, else cpu), `cpu`, `cuda`, `cuda:N`."""
    dtype: str = "auto"
    """`auto` (bf16 on GPU, fp32 on CPU), `float32`, `bfloat16`, `float16`."""
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "featurewire")
    """Where converted models are cached."""

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("model name must not be empty")

    @classmethod
    def from_env(cls, environ: Mapping[str, str], defaults: ModelConfig | None = None,
                 **overrides: object) -> ModelConfig:
        """`defaults` (else the built-in ones), then FEATUREWIRE_MODEL/DEVICE/DTYPE/CACHE, then explicit (non-None)
        overrides."""
        values: dict[str, object] = {}
        if f"{ENV_PREFIX}CACHE" in environ or defaults is None:
            values["cache_dir"] = default_cache_dir(environ)
        for key in ("model", "device", "dtype"):
            if f"{ENV_PREFIX}{key.upper()}" in environ:
                values["name" if key == "model" else key] = environ[f"{ENV_PREFIX}{key.upper()}"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "cache_dir" in overrides and overrides["cache_dir"] is not None:
            values["cache_dir"] = Path(str(overrides["cache_dir"])).expanduser()
        return replace(defaults, **values) if defaults is not None else cls(**values)  # type: ignore[arg-type]


def add_model_arguments(parser: argparse.ArgumentParser, default_model: str = "default") -> None:
    """The host-model flags every command of `featurewire-serve` and `featurewire-train` that loads a model takes."""
    parser.add_argument("--model", help="default | tiny-random | tiny-random-neox | DIR | FILE.gguf "
                        f"(env FEATUREWIRE_MODEL; default: {default_model})")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (env FEATUREWIRE_DEVICE)")
    parser.add_argument("--dtype", help="auto | float32 | bfloat16 | float16 (env FEATUREWIRE_DTYPE)")
    parser.add_argument("--cache-dir", help="converted-model cache (env FEATUREWIRE_CACHE; ~/.cache/featurewire)")


def model_config_from_args(args: argparse.Namespace, environ: Mapping[str, str],
                           defaults: ModelConfig | None = None) -> ModelConfig:
    """Flags win over the environment, which wins over `defaults` (e.g. a training config's [model] section)."""
    return ModelConfig.from_env(environ, defaults, name=args.model, device=args.device, dtype=args.dtype,
                                cache_dir=args.cache_dir)
