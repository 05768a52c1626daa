"""ModelConfig: the host-model settings both CLIs read (defaults, then FEATUREWIRE_*, then flags)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import ModelConfig


def test_defaults_env_then_overrides():
    assert ModelConfig.from_env({}).name == "default"
    assert ModelConfig.from_env({}).cache_dir == Path.home() / ".cache" / "featurewire"
    env = {"FEATUREWIRE_MODEL": "tiny-random", "FEATUREWIRE_DTYPE": "bfloat16", "FEATUREWIRE_CACHE": "/tmp/fw"}
    config = ModelConfig.from_env(env, device="cpu", dtype=None)
    assert (config.name, config.device, config.dtype, config.cache_dir) == (
        "tiny-random", "cpu", "bfloat16", Path("/tmp/fw"))
    assert ModelConfig.from_env(env, name="tiny-random-neox", cache_dir="/x").cache_dir == Path("/x")


def test_config_is_frozen_and_validated():
    config = ModelConfig()
    with pytest.raises(AttributeError):
        config.name = "other"  # type: ignore[misc]
    with pytest.raises(ValueError, match="must not be empty"):
        ModelConfig(name=" ")
