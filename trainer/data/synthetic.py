"""Synthetic activations made from a known sparse dictionary, to check that SAEs recover it.

`sparse_dictionary_data` draws x = Σ_i a_i d_i with a few active features per sample and
non-negative magnitudes (what ReLU-style SAEs model). `antipodal_data` makes each concept appear with
either sign along one direction (x = ±a·d), the case SA-GSAE's signed latents are built for: a
signed SAE needs one latent per concept, a non-negative SAE needs two (d and −d).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SyntheticData:
    x: Tensor  # (N, d) samples
    dictionary: Tensor  # (F, d) unit-norm ground-truth directions
    codes: Tensor  # (N, F) true coefficients (signed for antipodal data)


def random_dictionary(num_features: int, d: int, generator: torch.Generator) -> Tensor:
    directions = torch.randn(num_features, d, generator=generator)
    return directions / directions.norm(dim=1, keepdim=True)  # (F, d)


def _sparse_codes(n: int, num_features: int, active: float, generator: torch.Generator) -> Tensor:
    """Each feature fires independently with probability active/num_features; magnitudes in [0.5, 1.5]."""
    fires = torch.rand(n, num_features, generator=generator) < active / num_features
    magnitudes = 0.5 + torch.rand(n, num_features, generator=generator)
    return fires * magnitudes  # (N, F)


def _make(n: int, d: int, num_features: int, active: float, noise: float, seed: int, signed: bool) -> SyntheticData:
    generator = torch.Generator().manual_seed(seed)
    dictionary = random_dictionary(num_features, d, generator)
    codes = _sparse_codes(n, num_features, active, generator)
    if signed:
        codes = codes * torch.where(torch.rand(n, num_features, generator=generator) < 0.5, -1.0, 1.0)
    x = codes @ dictionary + noise * torch.randn(n, d, generator=generator)
    return SyntheticData(x, dictionary, codes)


def sparse_dictionary_data(
    n: int, d: int, num_features: int, active: float = 4.0, noise: float = 0.0, seed: int = 0
) -> SyntheticData:
    """x = codes @ dictionary (+ Gaussian noise), codes non-negative with `active` features per sample on average."""
    return _make(n, d, num_features, active, noise, seed, signed=False)


def antipodal_data(
    n: int, d: int, num_features: int, active: float = 4.0, noise: float = 0.0, seed: int = 0
) -> SyntheticData:
    """Like `sparse_dictionary_data`, but every active feature takes a random sign (x = ±a·d)."""
    return _make(n, d, num_features, active, noise, seed, signed=True)


def recovered_fraction(learned: Tensor, truth: Tensor, threshold: float = 0.9, signed: bool = False) -> float:
    """Share of true directions whose best-matching learned decoder row has cosine > threshold.

    learned (H, d) and truth (F, d) are unit rows; with `signed`, −d counts as a match for d
    (a signed latent represents both poles).
    """
    cosines = truth @ learned.t()  # (F, H)
    best = (cosines.abs() if signed else cosines).max(dim=1).values
    return float((best > threshold).float().mean())


def latents_per_feature(learned: Tensor, truth: Tensor, threshold: float = 0.9) -> Tensor:
    """For each true direction, how many learned rows match it or its negative (|cos| > threshold): (F,)."""
    return ((truth @ learned.t()).abs() > threshold).sum(dim=1)
