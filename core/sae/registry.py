"""The architecture registry: every SAE class by its `architecture` name, derived from the classes themselves.

It imports every architecture module (each of which imports only `core.sae.base`), so the names live in one
place, the classes' `architecture` attributes, and no module imports back into this one.
"""

from __future__ import annotations

from core.sae.base import SAEConfig, SparseAutoencoder
from core.sae.batchtopk import BatchTopKSAE
from core.sae.gated import GatedSAE
from core.sae.jumprelu import JumpReLUSAE
from core.sae.relu import ReLUSAE
from core.sae.sa_gsae import SignAwareGatedSAE
from core.sae.topk import TopKSAE

REGISTRY: dict[str, type[SparseAutoencoder]] = {
    cls.architecture: cls for cls in (ReLUSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE, GatedSAE, SignAwareGatedSAE)
}
ARCHITECTURES: tuple[str, ...] = tuple(REGISTRY)


def check_architecture(name: str) -> str:
    """`name` if an architecture is registered under it, else a ValueError that lists the choices."""
    if name not in REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    return name


def build_sae(cfg: SAEConfig) -> SparseAutoencoder:
    """Construct the architecture `cfg` names."""
    return REGISTRY[check_architecture(cfg.architecture)](cfg)
