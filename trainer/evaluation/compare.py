"""Side-by-side comparison of two evaluated stacks (e.g. plain vs ReSAE of the same architecture, width
and L0): per-stage rows for reconstruction, sparsity, single splice, redundancy and probing, and the
stack-level multi-layer splice. Reads the metrics recorded in stack.json, so it is instant; run
`featurewire-train eval` first (the `eval --compare` command does both)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from core.stack.reader import LoadedStack, read_stack
from trainer.evaluation.redundancy import decoder_redundancy

STAGE_ROWS: tuple[tuple[str, str], ...] = (
    ("fve", "FVE (activation space)"),
    ("residual_fve", "FVE on the residual target"),
    ("affine_fve", "FVE of the affine predictor alone"),
    ("l0", "L0"),
    ("dead_fraction", "dead fraction"),
    ("delta_ce", "ΔCE, this stage spliced (nats)"),
    ("ce_loss_recovered", "CE recovered, this stage spliced"),
    ("redundancy_raw_mean_max_cos", "redundancy vs previous stage, raw (mean max \\|cos\\|)"),
    ("redundancy_raw_frac_above", "  fraction of atoms above 0.9, raw"),
    ("redundancy_mapped_mean_max_cos", "redundancy vs previous stage mapped through A (the ReSAE's A)"),
    ("redundancy_mapped_frac_above", "  fraction of atoms above 0.9, mapped"),
    ("probe_mean_k1", "sparse probing accuracy, k=1"),
    ("probe_mean_k2", "sparse probing accuracy, k=2"),
    ("probe_mean_k5", "sparse probing accuracy, k=5"),
    ("probe_mean_k20", "sparse probing accuracy, k=20"),
)
STACK_ROWS: tuple[tuple[str, str], ...] = (
    ("ce_clean", "CE clean (nats)"),
    ("multi_tf_delta_ce", "multi-layer ΔCE, teacher-forced"),
    ("multi_tf_kl", "multi-layer KL, teacher-forced"),
    ("multi_tf_ce_loss_recovered", "multi-layer CE recovered, teacher-forced"),
    ("multi_online_delta_ce", "multi-layer ΔCE, online"),
    ("multi_online_kl", "multi-layer KL, online"),
    ("multi_online_ce_loss_recovered", "multi-layer CE recovered, online"),
    ("multi_ce_zero_ablation", "CE with every selected layer zero-ablated"),
)


def _cell(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return "–"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"


def stack_summary(stack_dir: str | Path, *, borrow_maps_from: str | Path | None = None) -> dict[str, Any]:
    """The recorded metrics of a stack: {name, stages: [{name, hookpoint, residual_of, metrics}], metrics}.

    With `borrow_maps_from` (a residualized stack over the same hookpoints), a plain stack's stages also get
    the mapped redundancy computed with that stack's affine maps, so both columns compare atoms in the
    same mapped space."""
    stack = read_stack(stack_dir)
    stages = [{"name": s.name, "hookpoint": s.hookpoint, "architecture": s.sae.cfg.architecture,
               "d_sae": s.sae.d_sae, "residual_of": s.residual_of, "metrics": dict(s.metrics)} for s in stack.stages]
    if borrow_maps_from is not None:
        _borrow_mapped_redundancy(stack, read_stack(borrow_maps_from), stages)
    return {"name": stack.name, "metrics": stack.metrics, "stages": stages}


def _borrow_mapped_redundancy(stack: LoadedStack, other: LoadedStack, stages: list[dict[str, Any]]) -> None:
    if [s.hookpoint for s in stack.stages] != [s.hookpoint for s in other.stages]:
        return
    for i, (mine, theirs) in enumerate(zip(stack.stages, other.stages, strict=True)):
        if mine.affine is not None or theirs.affine is None or theirs.residual_of != i - 1:
            continue
        mapped = decoder_redundancy(stack.stages[i - 1].sae.W_dec, mine.sae.W_dec, theirs.affine.A)
        stages[i]["metrics"].update({k: v for k, v in mapped.items() if k.startswith("redundancy_mapped")})


def _rows(label: str, key: str, left: Mapping[str, Any], right: Mapping[str, Any]) -> str | None:
    a, b = left.get(key), right.get(key)
    if a is None and b is None:
        return None
    return f"| {label} | {_cell(a)} | {_cell(b)} |"


def comparison_table(left: Mapping[str, Any], right: Mapping[str, Any]) -> str:
    """A markdown table: one block per stage (matched by position), then the stack-level rows."""
    names = (left["name"], right["name"])
    lines = [f"| metric | {names[0]} | {names[1]} |", "| --- | ---: | ---: |"]
    stages: Sequence[tuple[dict, dict]] = list(zip(left["stages"], right["stages"], strict=False))
    for i, (a, b) in enumerate(stages):
        where = a["hookpoint"] if a["hookpoint"] == b["hookpoint"] else f"{a['hookpoint']} / {b['hookpoint']}"
        kinds = ["residual" if s.get("residual_of") is not None else "plain" for s in (a, b)]
        lines.append(f"| **stage {i}: {where}** | {kinds[0]} | {kinds[1]} |")
        lines += [row for key, label in STAGE_ROWS if (row := _rows(label, key, a["metrics"], b["metrics"]))]
    stack_rows = [row for key, label in STACK_ROWS if (row := _rows(label, key, left["metrics"], right["metrics"]))]
    if stack_rows:
        lines += ["| **whole stack** | | |", *stack_rows]
    return "\n".join(lines)
