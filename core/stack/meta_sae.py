"""Meta-latents of a served feature: which meta-SAE latents its decoder row decomposes into.

A stage trained with meta-SAE regularisation (trainer/training/meta_sae.py) carries its meta-SAE in the stack
(`stages[].meta_sae`, read into `LoadedStage.meta_sae`). The meta-SAE was trained on the unit decoder
rows in the SAE's input space; at serving time it encodes one row with its calibrated BatchTopK
threshold, so a feature's meta-latents do not depend on which other features are asked about.
Torch-only, so the service may import it.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from core.sae.base import SparseAutoencoder


class HasMetaSAE(Protocol):
    name: str
    sae: SparseAutoencoder
    meta_sae: SparseAutoencoder | None


@torch.no_grad()
def meta_latents(stage: HasMetaSAE, feature_index: int) -> tuple[Tensor, Tensor]:
    """(indices, values), both (n_active,), of the meta-latents of feature `feature_index`, largest first.

    Raises ValueError when the stage has no meta-SAE, IndexError when the feature is out of range."""
    if stage.meta_sae is None:
        raise ValueError(f"stage {stage.name!r} has no meta-SAE (it was not trained with [meta_sae])")
    if not 0 <= feature_index < stage.sae.d_sae:
        raise IndexError(f"feature {feature_index} out of range: stage {stage.name!r} has {stage.sae.d_sae}")
    row = stage.sae.W_dec[feature_index]  # (d_in,)
    row = (row / row.norm().clamp_min(1e-8)).to(stage.meta_sae.W_dec.dtype)
    z = stage.meta_sae.encode(row[None])[0]  # (width,)
    indices = z.nonzero().squeeze(1)
    order = z[indices].abs().argsort(descending=True)
    return indices[order], z[indices[order]]
