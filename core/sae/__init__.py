"""SAE architectures (torch-only): one module each on a shared base. The service imports these."""

from core.sae.base import (
    ARCHITECTURES,
    ForwardOutput,
    SAEConfig,
    SparseAutoencoder,
    build_sae,
    l0,
    top_k_by_magnitude,
)

__all__ = ["ARCHITECTURES", "ForwardOutput", "SAEConfig", "SparseAutoencoder", "build_sae", "l0", "top_k_by_magnitude"]
