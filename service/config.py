"""Frozen configuration objects, built once from defaults, environment and flags.

No module reads the environment at import: `ModelConfig.from_env(os.environ)` is called by the CLI.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
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
    def from_env(cls, environ: Mapping[str, str], **overrides: object) -> ModelConfig:
        """Defaults, then FEATUREWIRE_MODEL/DEVICE/DTYPE/CACHE, then explicit (non-None) overrides."""
        values: dict[str, object] = {"cache_dir": default_cache_dir(environ)}
        for key in ("model", "device", "dtype"):
            if f"{ENV_PREFIX}{key.upper()}" in environ:
                values["name" if key == "model" else key] = environ[f"{ENV_PREFIX}{key.upper()}"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "cache_dir" in overrides and overrides["cache_dir"] is not None:
            values["cache_dir"] = Path(str(overrides["cache_dir"])).expanduser()
        return cls(**values)  # type: ignore[arg-type]
