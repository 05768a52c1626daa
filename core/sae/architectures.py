"""Imports every architecture module so that each registers itself with `core.sae.base`."""

from core.sae import batchtopk, gated, jumprelu, relu, sa_gsae, topk  # noqa: F401
