"""Shared fixtures: the tiny random host models (built offline from configs) and the embedded default."""

from __future__ import annotations

import os

import pytest
import torch

from core.config import ModelConfig
from core.host.host_model import HostModel
from core.host.loading import load_host_model

TINY_MODELS = ("tiny-random", "tiny-random-neox")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session", params=TINY_MODELS)
def tiny_host(request: pytest.FixtureRequest) -> HostModel:
    """Each tiny architecture in turn (Gemma 3 and GPT-NeoX), on the CPU in fp32."""
    return load_host_model(ModelConfig(name=request.param, device="cpu"))


@pytest.fixture(scope="session")
def tiny_gemma() -> HostModel:
    return load_host_model(ModelConfig(name="tiny-random", device="cpu"))


@pytest.fixture(scope="session")
def default_host() -> HostModel:
    """The embedded Gemma 3 270M (converted into the user's cache on first use, ~45 s)."""
    return load_host_model(ModelConfig.from_env(os.environ, device="cpu"))
