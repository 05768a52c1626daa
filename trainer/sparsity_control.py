"""Per-stage sparsity control: steer a λ-penalised SAE towards a target L0 while it trains.

Why: one λ does not fit every stage. Residual (ReSAE) targets and different hookpoints respond to the same
penalty with L0s that differ by 5× or more (the first demo stack: 50 / 135 / 311 / 269 at one λ), and a
λ sweep per stage is too costly on a CPU. The controller multiplies λ by m and nudges log m after every
step by gain·log(L0_ema / target), so the penalty rises while a stage is too dense and falls while it is
too sparse. It is a training-time device only: the trained SAE does not depend on λ, and the final
multiplier is recorded in the stage's training summary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CONTROLLED_ARCHITECTURES = ("relu", "gated", "jumprelu", "sa_gsae")
"""Architectures whose L0 is set by a penalty; TopK-style SAEs fix L0 through k instead."""


@dataclass
class L0Controller:
    target: float
    gain: float = 0.02
    """Change of log m per step per unit of log(L0 / target); small, so the optimiser keeps up."""
    ema: float = 0.9
    """Smoothing of the measured L0 (batches are noisy)."""
    max_log_multiplier: float = math.log(1e3)
    log_multiplier: float = 0.0
    l0_ema: float = 0.0

    def __post_init__(self) -> None:
        if self.target <= 0:
            raise ValueError(f"target L0 must be > 0, got {self.target}")

    @property
    def multiplier(self) -> float:
        return math.exp(self.log_multiplier)

    def update(self, l0: float) -> None:
        """Record one step's mean L0 and move the multiplier towards the target."""
        self.l0_ema = l0 if self.l0_ema == 0.0 else self.ema * self.l0_ema + (1 - self.ema) * l0
        error = math.log(max(self.l0_ema, 1e-3) / self.target)
        bound = self.max_log_multiplier
        self.log_multiplier = min(bound, max(-bound, self.log_multiplier + self.gain * error))

    def state_dict(self) -> dict[str, float]:
        return {"log_multiplier": self.log_multiplier, "l0_ema": self.l0_ema}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.log_multiplier = float(state["log_multiplier"])
        self.l0_ema = float(state["l0_ema"])


def make_controller(architecture: str, target_l0: float) -> L0Controller | None:
    """A controller when a target is set (> 0); refuses architectures whose L0 is not penalty-driven."""
    if target_l0 <= 0:
        return None
    if architecture not in CONTROLLED_ARCHITECTURES:
        raise ValueError(f"sae.target_l0 applies to {', '.join(CONTROLLED_ARCHITECTURES)}; "
                         f"{architecture!r} sets its L0 with k")
    return L0Controller(target_l0)
