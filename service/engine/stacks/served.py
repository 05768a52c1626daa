"""A stack as the service serves it: loaded for one host model, checked against it, self-checked.

Loading refuses a stack that cannot be right for the host model: another model (identity mismatch),
a hookpoint the model does not have, a stage whose input width differs from its hookpoint's. Those
checks cannot catch a stack that names the *wrong* hookpoint of the right model (a layer mix-up in a
hand-edited stack.json, a stack trained on resid_post shipped as resid_pre). The self-check does: it
runs the stack on built-in calibration text and compares each stage's FVE and L0 with what the stack
recorded when it was evaluated; an SAE reading activations it was not trained on reconstructs them
badly and fires at the wrong rate, and the stack is refused.

Calibration text is a fixed slice of the pydoc topic pages that ship with Python (`pydoc_data.topics`),
read here directly: the service never imports the trainer's corpus module.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.errors import FailedPrecondition, NotFound
from core.host.host_model import HostModel
from core.sae.base import l0
from core.stack.identity import HostModelIdentity
from core.stack.manifest import StackError
from core.stack.reader import LoadedStack, LoadedStage, read_stack
from core.stack.runtime import RuntimeStage, StackRuntime

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------- self-check
# Tolerances. The recorded metrics come from the trainer's evaluation on its held-out split; the
# calibration text is other text of the same kind. Measured on Gemma 3 270M (a TopK stack at
# blocks.3/6 resid_post and blocks.9 mlp_out, recorded FVE 0.84/0.83/0.73) and on the tiny test
# stacks, honest stages land within 0.03 of their record. The same SAEs pointed at a neighbouring
# hookpoint lose 0.13 (mlp_out 9 -> 10), 0.15 (resid_post 3 -> 4), 0.47 (resid_post 6 -> 7) or go
# negative (resid_post 6 -> 3: -5.5; resid_post 3 -> resid_pre 3: -0.98). 0.1 refuses all of those
# while leaving three times the largest honest shortfall seen; a stack trained on text far from
# English prose (code only, say) may need `--no-self-check`. L0 catches what FVE misses for
# threshold SAEs (JumpReLU, gated, SA-GSAE), whose firing rate moves with the input's scale; TopK
# always fires k.
FVE_TOLERANCE = 0.1
"""Refuse a stage whose measured FVE is below its recorded FVE minus this (absolute, activation space)."""
L0_RATIO = 3.0
"""Refuse a stage whose measured mean L0 lies outside [recorded / L0_RATIO, recorded · L0_RATIO] ..."""
L0_SLACK = 1.0
"""... widened by this many latents on each side, so very sparse stages (recorded L0 ≈ 1) do not fail on
the noise of a few hundred tokens."""

FVE_FLOOR = 0.0
"""With no recorded FVE to compare with (e.g. an imported SAE), refuse a stage that explains less than the
mean does: no working SAE does that at its own hookpoint, while one at a wrong hookpoint or with a wrong
input scale typically does."""

CALIBRATION_TOPICS = ("truth", "if", "while", "for", "class", "function", "try", "assignment", "with", "import")
"""pydoc topic pages (language-reference prose), read in this order, window after window."""
CALIBRATION_TOKENS = 768
"""Real tokens to measure on: enough for a stable pooled FVE, about a second of CPU on Gemma 3 270M."""
CALIBRATION_WINDOW = 128
"""Tokens per window, BOS included (or the stack's training context length, when that is shorter)."""


@dataclass
class ServedStack:
    """A loaded, verified stack with its runtime; `self_check` holds what the self-check measured."""

    name: str
    path: Path
    digest: str
    loaded: LoadedStack
    runtime: StackRuntime
    self_check: dict[str, Any] = field(default_factory=dict)  # stage name -> {fve, l0, recorded_*, passed}

    @property
    def stage_names(self) -> list[str]:
        return [stage.name for stage in self.loaded.stages]

    def stage_index(self, name: str) -> int:
        """The index of the stage called `name`; NotFound lists the stages there are."""
        for stage in self.loaded.stages:
            if stage.name == name:
                return stage.index
        raise NotFound(f"stack {self.name!r} has no stage {name!r}; its stages are {self.stage_names}")

    def stage(self, index: int) -> LoadedStage:
        return self.loaded.stages[index]

    def has_error_predictor(self, index: int) -> bool:
        """Whether `predicted_error_norm` reports anything for this stage (the stack stores its probes)."""
        return self.runtime.stages[index].error_predictor is not None


def predicted_error_norm(stack: ServedStack, stage: int | RuntimeStage, h: Tensor,
                         prev: Tensor | None = None) -> Tensor | None:
    """The predicted error norm ‖h − ĥ‖ per token, (N,), from the stage's norm probe (core/stack/error_predictor.py)
    applied to the stage's SAE input computed from h (N, d) and, for a residual stage, `prev`, the source
    stage's activation; None when the stage has no predictor. The one place decompose, generation and
    EncodeActivations ask for it.
    """
    runtime = stack.runtime
    return runtime.predict_error_norm(runtime.stages[stage] if isinstance(stage, int) else stage, h, prev)


# ------------------------------------------------------------------------------------------ loading


def load_served_stack(path: str | Path, host: HostModel, *, self_check: bool = True) -> ServedStack:
    """Read and verify the stack at `path` for `host`, build its runtime and (by default) self-check it.

    Raises FailedPrecondition with a message saying what is wrong: a broken or foreign stack, an unknown
    hookpoint, a width mismatch, or a self-check outside tolerance of the recorded metrics.
    """
    path = Path(path)
    identity = HostModelIdentity.from_model(host.model, host.name)
    try:
        loaded = read_stack(path, expect_model=identity, device=host.device)
    except StackError as exc:
        raise FailedPrecondition(f"cannot serve the stack at {str(path)!r}: {exc}") from None
    _check_hookpoints(loaded, host)
    try:
        runtime = StackRuntime.from_loaded(loaded)
    except ValueError as exc:
        raise FailedPrecondition(f"stack {loaded.name!r}: {exc}") from None
    served = ServedStack(loaded.name, path, loaded.digest, loaded, runtime)
    if self_check:
        served.self_check = run_self_check(host, served)
        failed = [f"{name}: {result['reason']}" for name, result in served.self_check.items() if not result["passed"]]
        if failed:
            raise FailedPrecondition(
                f"stack {loaded.name!r} failed its self-check on built-in calibration text ({'; '.join(failed)}); "
                "is every stage's hookpoint the one it was trained on, for this model?")
    return served


def _check_hookpoints(loaded: LoadedStack, host: HostModel) -> None:
    for stage in loaded.stages:
        where = f"stack {loaded.name!r} stage {stage.index} ({stage.name!r})"
        try:
            width = host.hookpoints.get(stage.hookpoint).dim
        except NotFound as exc:
            raise FailedPrecondition(f"{where} reads a hookpoint that model {host.name!r} does not have: "
                                     f"{exc.message}") from None
        if stage.sae.d_in != width:
            raise FailedPrecondition(f"{where} reads hookpoint {stage.hookpoint!r}, which is {width} wide on "
                                     f"model {host.name!r}, but its SAE takes d_in={stage.sae.d_in}")


# --------------------------------------------------------------------------------------- self-check


def calibration_pages() -> list[str]:
    """The built-in calibration prose: pydoc topic pages (stdlib module docstrings if pydoc_data is absent)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        import argparse
        import collections
        import json
        import pathlib
        import textwrap
        return [textwrap.dedent(m.__doc__ or "") for m in (json, argparse, collections, pathlib, textwrap)]
    names = [n for n in CALIBRATION_TOPICS if n in topics] or sorted(topics)
    return [topics[n].strip() for n in names]


def calibration_windows(host: HostModel, window: int = CALIBRATION_WINDOW,
                        tokens: int = CALIBRATION_TOKENS) -> list[Tensor]:
    """Token windows (1, T) on the host's device, each BOS + up to window − 1 tokens of one page (the
    trainer's windows: requests start with BOS too), in page order until `tokens` real tokens."""
    tokenizer = host.tokenizer
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    span = max(1, window - len(prefix))
    out: list[Tensor] = []
    covered = 0
    for page in calibration_pages():
        ids = tokenizer(page, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), span):
            if covered >= tokens:
                return out
            piece = ids[start : start + min(span, tokens - covered)]
            out.append(torch.tensor([prefix + piece], dtype=torch.int64, device=host.device))
            covered += len(piece)
    return out


class _PooledStats:
    """Pooled FVE and mean L0 in activation space, accumulated in float64 over batches of tokens:
    FVE = 1 − Σ‖h − ĥ‖² / Σ‖h − h̄‖² (the trainer's ReconstructionAccumulator definition)."""

    def __init__(self) -> None:
        self.n = 0
        self.sq_err = 0.0
        self.sq_norm = 0.0
        self.l0_sum = 0.0
        self.h_sum: Tensor | None = None  # (d,)

    def update(self, h: Tensor, recon: Tensor, codes: Tensor) -> None:
        h, recon = h.double(), recon.double()  # (N, d)
        self.sq_err += float((h - recon).pow(2).sum())
        self.sq_norm += float(h.pow(2).sum())
        self.l0_sum += float(l0(codes).double().sum())
        total = h.sum(dim=0)
        self.h_sum = total if self.h_sum is None else self.h_sum + total
        self.n += h.shape[0]

    def fve(self) -> float:
        if self.n == 0 or self.h_sum is None:
            return math.nan
        variance = self.sq_norm - float(self.h_sum.pow(2).sum()) / self.n  # Σ‖h − h̄‖²
        return 1.0 - self.sq_err / variance if variance > 0 else math.nan

    def mean_l0(self) -> float:
        return self.l0_sum / self.n if self.n else math.nan


def _training_context(stack: ServedStack) -> int | None:
    """The context length the stack was trained with, when its stages record their training config."""
    config = stack.loaded.stages[0].training.get("config")
    activations = config.get("activations") if isinstance(config, dict) else None
    value = activations.get("context_length") if isinstance(activations, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 1 else None


def _special_ids(host: HostModel) -> Tensor:
    tokenizer = host.tokenizer
    ids = set(tokenizer.all_special_ids) | {i for i in (tokenizer.bos_token_id, tokenizer.pad_token_id)
                                              if i is not None}
    return torch.tensor(sorted(ids), dtype=torch.int64, device=host.device)


@torch.inference_mode()
def measure_stack(host: HostModel, stack: ServedStack, windows: list[Tensor]) -> list[_PooledStats]:
    """Per stage: pooled FVE and mean L0 over the real (non-special) tokens of `windows`, one forward
    pass per window that stops after the last hookpoint the stack reads."""
    runtime = stack.runtime
    stats = [_PooledStats() for _ in runtime.stages]
    special = _special_ids(host)
    for ids in windows:  # (1, T)
        keep = ~torch.isin(ids[0], special)  # (T,)
        if not bool(keep.any()):
            continue
        captures = host.forward(ids, reads=runtime.hookpoints).captures
        acts = {hp: captures[hp][0][keep] for hp in runtime.hookpoints}  # (n, d)
        for i, result in runtime.decompose(acts).items():
            stats[i].update(acts[runtime.stages[i].hookpoint], result.recon, result.codes)
    return stats


def _recorded(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _judge(fve: float, mean_l0: float, recorded_fve: float | None, recorded_l0: float | None) -> str:
    """Why a stage fails its self-check, or "" when it passes."""
    problems = []
    if recorded_fve is None:
        if not fve >= FVE_FLOOR:  # NaN fails too
            problems.append(f"FVE {fve:.3f} is below {FVE_FLOOR} (no recorded FVE to compare with)")
    elif not fve >= recorded_fve - FVE_TOLERANCE:
        problems.append(f"FVE {fve:.3f} is below the recorded {recorded_fve:.3f} by more than {FVE_TOLERANCE}")
    if recorded_l0 is not None:
        low, high = recorded_l0 / L0_RATIO - L0_SLACK, recorded_l0 * L0_RATIO + L0_SLACK
        if not low <= mean_l0 <= high:
            problems.append(f"mean L0 {mean_l0:.2f} is outside [{max(low, 0.0):.2f}, {high:.2f}] "
                            f"around the recorded {recorded_l0:.2f}")
    return " and ".join(problems)


def run_self_check(host: HostModel, stack: ServedStack) -> dict[str, dict[str, Any]]:
    """Measure every stage on the calibration text and judge it against its recorded metrics.

    Returns {stage name: {hookpoint, tokens, fve, l0, recorded_fve, recorded_l0, passed, reason}}; a
    stage without recorded metrics passes unless its FVE is below FVE_FLOOR.
    """
    context = _training_context(stack)
    window = min(CALIBRATION_WINDOW, context) if context else CALIBRATION_WINDOW
    stats = measure_stack(host, stack, calibration_windows(host, window))
    report = {}
    for stage, measured in zip(stack.loaded.stages, stats, strict=True):
        recorded_fve, recorded_l0 = _recorded(stage.metrics, "fve"), _recorded(stage.metrics, "l0")
        fve, mean_l0 = measured.fve(), measured.mean_l0()
        reason = _judge(fve, mean_l0, recorded_fve, recorded_l0)
        report[stage.name] = {"hookpoint": stage.hookpoint, "tokens": measured.n, "fve": fve, "l0": mean_l0,
                              "recorded_fve": recorded_fve, "recorded_l0": recorded_l0, "passed": not reason,
                              "reason": reason}
        logger.info("stack %s stage %s self-check: FVE %.3f (recorded %s), L0 %.2f (recorded %s)%s", stack.name,
                    stage.name, fve, recorded_fve, mean_l0, recorded_l0, f": {reason}" if reason else "")
    return report
