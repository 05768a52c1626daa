"""The stack runtime: what a stack computes from the activations that actually flowed, for training-time
evaluation and for serving alike (one implementation; torch-only, so the service imports it).

A stage reads its hookpoint's activation h. A plain stage encodes x = s·h (s = input scale); a residual
(ReSAE) stage m+1 encodes r = s·(h − A h_m − c), where h_m is what flowed at the hookpoint of the stage
it reads from, and maps back with ĥ = A h_m + c + r̂ / s. Either way the SAE sees `sae_input` and its
reconstruction returns to activation space through `to_activation`.

An edit of codes z → z' changes the activation by (z' − z) W_dec / s: only the edited features move and
the SAE's reconstruction error stays (error-preserving). Codes and edits of a few tokens (a generation step)
with few non-zeros (TopK and BatchTopK codes, any edit) decode through their active latents only, sparing a
read of all of W_dec; other codes keep the matmul (`decode_codes`). A later residual stage computes
its residual from the edited activation that flowed, so the predictor carries the edit and the later stage
does not re-express it.

`StackPass` runs inside a forward pass: it hands each stage's (h, h_prev) to a handler in forward order
and records what flowed after the handler, so residual stages downstream see edits and splices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from core.sae.base import SparseAutoencoder
from core.sae.sparse_decode import decode_codes
from core.stack.affine import AffineMap
from core.stack.error_predictor import ErrorPredictor
from core.stack.reader import LoadedStack


@dataclass(frozen=True, eq=False)
class RuntimeStage:
    """One stage as the runtime needs it."""

    index: int
    name: str
    hookpoint: str
    sae: SparseAutoencoder
    input_scale: float  # s: the activation scale (plain) or the residual scale (residual)
    residual_of: int | None = None  # index of the stage whose flowed activation feeds the predictor
    affine: AffineMap | None = None  # h ≈ A h_prev + c, for residual stages
    error_predictor: ErrorPredictor | None = None  # probes of ‖h − ĥ‖ from the SAE input

    @property
    def is_residual(self) -> bool:
        return self.residual_of is not None


@dataclass(frozen=True, eq=False)
class StageResult:
    """A stage's decomposition of N activations (leading dims flattened)."""

    codes: Tensor  # (N, d_sae), signed for SA-GSAE
    sae_input: Tensor  # (N, d) what the SAE encoded (scaled activation or scaled residual)
    sae_recon: Tensor  # (N, d) the SAE's reconstruction in its input space
    recon: Tensor  # (N, d) reconstruction in activation space
    error: Tensor  # (N, d) h − recon, in activation space
    predicted_error_norm: Tensor | None = None  # (N,) the stage's norm probe, when it has one

    def error_norm(self) -> Tensor:
        return self.error.norm(dim=-1)  # (N,)


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


class StackRuntime:
    """The stages of a stack over one host model, in forward order."""

    def __init__(self, stages: Sequence[RuntimeStage]) -> None:
        self.stages = list(stages)
        for position, stage in enumerate(self.stages):
            if stage.index != position:
                raise ValueError(f"stage {stage.name!r} has index {stage.index}, expected {position}")
            if stage.input_scale <= 0:
                raise ValueError(f"stage {stage.name!r}: input_scale must be > 0")
            if stage.is_residual:
                self._check_residual(stage)

    def _check_residual(self, stage: RuntimeStage) -> None:
        source = stage.residual_of
        assert source is not None
        if stage.affine is None or not 0 <= source < stage.index:
            raise ValueError(f"residual stage {stage.name!r} needs an affine map and an earlier stage to read from")
        d_out, d_prev = stage.affine.A.shape
        if (d_out, d_prev) != (stage.sae.d_in, self.stages[source].sae.d_in):
            raise ValueError(f"residual stage {stage.name!r}: A is {d_out}×{d_prev}, expected "
                             f"{stage.sae.d_in}×{self.stages[source].sae.d_in}")

    @classmethod
    def from_loaded(cls, stack: LoadedStack) -> StackRuntime:
        return cls([RuntimeStage(s.index, s.name, s.hookpoint, s.sae, s.input_scale, s.residual_of, s.affine,
                                 s.error_predictor) for s in stack.stages])

    # ------------------------------------------------------------------------------------- per stage

    @property
    def hookpoints(self) -> list[str]:
        """Distinct hookpoints in stage order."""
        return list(dict.fromkeys(s.hookpoint for s in self.stages))

    def dependencies(self, indices: Iterable[int]) -> list[int]:
        """The stages `indices` need, with the stages their residuals read from (transitively), sorted."""
        needed, todo = set(), list(indices)
        while todo:
            i = todo.pop()
            if i not in needed:
                needed.add(i)
                if (source := self.stages[i].residual_of) is not None:
                    todo.append(source)
        return sorted(needed)

    def _device_dtype(self, stage: RuntimeStage) -> tuple[torch.device, torch.dtype]:
        p = stage.sae.W_dec
        return p.device, p.dtype

    def sae_input(self, stage: RuntimeStage, h: Tensor, prev: Tensor | None = None) -> Tensor:
        """x = s·h, or s·(h − A h_prev − c) for a residual stage: (N, d)."""
        device, dtype = self._device_dtype(stage)
        h = _flat(h).to(device, dtype)  # (N, d)
        if stage.affine is None:
            return h * stage.input_scale
        prev = self._prev(stage, prev).to(device, dtype)
        return stage.affine.residual(prev, h).to(dtype)

    def to_activation(self, stage: RuntimeStage, y: Tensor, prev: Tensor | None = None) -> Tensor:
        """Map an SAE-space vector back: y / s, or A h_prev + c + y / s for a residual stage: (N, d)."""
        if stage.affine is None:
            return y / stage.input_scale
        return stage.affine.reconstruct(self._prev(stage, prev).to(y.device, y.dtype), y).to(y.dtype)

    @staticmethod
    def _prev(stage: RuntimeStage, prev: Tensor | None) -> Tensor:
        if prev is None:
            raise ValueError(f"residual stage {stage.name!r} needs the activation of stage {stage.residual_of}")
        return _flat(prev)

    def encode(self, stage: RuntimeStage, h: Tensor, prev: Tensor | None = None) -> Tensor:
        return stage.sae.encode(self.sae_input(stage, h, prev))  # (N, d_sae)

    def run_stage(self, stage: RuntimeStage, h: Tensor, prev: Tensor | None = None) -> StageResult:
        x = self.sae_input(stage, h, prev)  # (N, d)
        z = stage.sae.encode(x)  # (N, d_sae)
        x_hat = stage.sae.decode_codes(z)  # (N, d), = sae.decode(z)
        recon = self.to_activation(stage, x_hat, prev)
        predicted = stage.error_predictor.predict_norm(x) if stage.error_predictor is not None else None
        return StageResult(z, x, x_hat, recon, _flat(h).to(recon.device, recon.dtype) - recon, predicted)

    def predict_error_norm(self, stage: RuntimeStage, h: Tensor, prev: Tensor | None = None) -> Tensor | None:
        """The stage's predicted ‖h − ĥ‖ (N,) from the activation that flowed, without encoding; None when
        the stage has no error predictor. The same number `run_stage` reports."""
        if stage.error_predictor is None:
            return None
        return stage.error_predictor.predict_norm(self.sae_input(stage, h, prev))

    def edit_delta(self, stage: RuntimeStage, z: Tensor, z_new: Tensor) -> Tensor:
        """The activation change of an error-preserving edit z → z': (z' − z) W_dec / s, (N, d). Only the
        edited entries of z' − z are non-zero, so for a few tokens this decodes them alone (`decode_codes`)."""
        return decode_codes(z_new - z, stage.sae.W_dec) / stage.input_scale

    def apply_edit(self, stage: RuntimeStage, h: Tensor, prev: Tensor | None,
                   edit: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Encode h, edit the codes, and return (h', z, z') with h' = h + edit_delta, shaped like h."""
        z = self.encode(stage, h, prev)  # (N, d_sae)
        z_new = edit(z)
        delta = self.edit_delta(stage, z, z_new).reshape(h.shape)
        return h + delta.to(h.dtype), z, z_new

    # ------------------------------------------------------------------------------------- whole stack

    def decompose(self, activations: Mapping[str, Tensor],
                  indices: Iterable[int] | None = None) -> dict[int, StageResult]:
        """Teacher-forced: every stage (or `indices`) from the activations that flowed at its hookpoint
        (and at its source stage's hookpoint). `activations` maps hookpoint -> (..., d)."""
        wanted = range(len(self.stages)) if indices is None else indices
        results = {}
        for i in wanted:
            stage = self.stages[i]
            prev = None if stage.residual_of is None else activations[self.stages[stage.residual_of].hookpoint]
            results[i] = self.run_stage(stage, activations[stage.hookpoint], prev)
        return results

    def new_pass(self, handler: StageHandler, indices: Iterable[int] | None = None) -> StackPass:
        return StackPass(self, handler, range(len(self.stages)) if indices is None else indices)


StageHandler = Callable[[RuntimeStage, Tensor, "Tensor | None"], Tensor]
"""(stage, h (B, T, d) as it arrives, h_prev (B, T, d) that flowed at its source or None) -> what flows on."""


class StackPass:
    """Per-forward-pass state: calls the handler for the chosen stages in forward order and records what
    flowed at every stage it needs (the chosen ones and their residual sources). One per request and
    forward pass; never shared, so concurrent requests cannot see each other's edits."""

    def __init__(self, runtime: StackRuntime, handler: StageHandler, indices: Iterable[int]) -> None:
        self.runtime = runtime
        self.handler = handler
        self.chosen = set(indices)
        self.needed = runtime.dependencies(self.chosen)
        self.flowed: dict[int, Tensor] = {}  # stage index -> (B, T, d) after the handler

    def writes(self) -> dict[str, Callable[[Tensor], Tensor]]:
        """Activation edits keyed by hookpoint, for the host model's write hooks."""
        by_hookpoint: dict[str, list[RuntimeStage]] = {}
        for i in self.needed:
            stage = self.runtime.stages[i]
            by_hookpoint.setdefault(stage.hookpoint, []).append(stage)
        return {hp: self._edit_for(stages) for hp, stages in by_hookpoint.items()}

    def _edit_for(self, stages: list[RuntimeStage]) -> Callable[[Tensor], Tensor]:
        def edit(h: Tensor) -> Tensor:  # h: (B, T, d)
            for stage in stages:
                if stage.index in self.chosen:
                    prev = None if stage.residual_of is None else self.flowed[stage.residual_of]
                    h = self.handler(stage, h, prev)
                self.flowed[stage.index] = h
            return h

        return edit
