"""Imports every architecture module so that each registers itself with `trainer.sae.base`."""

from trainer.sae import batchtopk, gated, jumprelu, relu, sa_gsae, topk  # noqa: F401
