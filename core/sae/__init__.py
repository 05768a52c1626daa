"""SAE architectures (torch-only): one module each on a shared base, named in `registry`. The service imports these."""

from core.sae.base import ForwardOutput, SAEConfig, SparseAutoencoder, l0, top_k_by_magnitude
from core.sae.registry import ARCHITECTURES, build_sae

__all__ = ["ARCHITECTURES", "ForwardOutput", "SAEConfig", "SparseAutoencoder", "build_sae", "l0", "top_k_by_magnitude"]
