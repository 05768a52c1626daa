"""Report section 1: SA-GSAE at width H against a Gated SAE at 2H and JumpReLU / TopK at H, over a
sparsity sweep at three mid-depth hookpoints (residual stream, MLP out, attention out).

Every run trains one plain stack whose three stages read the three hookpoints from one shared activation
store, so all architectures see identical batches. Outputs: the FVE-vs-L0 Pareto table and plot per
hookpoint, the dead fraction interpolated at matched L0, and SA-GSAE without its auxiliary loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.report.markdown import Table, fmt
from trainer.report.runs import ReportSettings, base_config, missing_note, train_or_reuse

LAYER = 9
HOOKPOINTS = [f"blocks.{LAYER}.hook_resid_post", f"blocks.{LAYER}.hook_mlp_out", f"blocks.{LAYER}.hook_attn_out"]
WIDTH = 1024
PAPER_PAIR = ("SA-GSAE (H)", "Gated (2H)")


@dataclass(frozen=True)
class SweepRun:
    family: str
    """Row label shared by a sparsity sweep, e.g. 'SA-GSAE (H)'."""
    architecture: str
    width: int
    knob: str
    value: float
    aux: bool = True

    @property
    def name(self) -> str:
        tag = "" if self.aux else "-noaux"
        knob = "lambda" if self.knob == "λ" else self.knob
        return f"{self.architecture}{tag}-w{self.width}-{knob}{self.value:g}"

    def sae(self) -> dict[str, Any]:
        sae: dict[str, Any] = {"architecture": self.architecture, "width": self.width}
        if self.knob == "k":
            sae["k"] = int(self.value)
        else:
            sae["sparsity_coefficient"] = self.value
        if self.architecture == "jumprelu":
            sae |= {"threshold_init": 0.5, "bandwidth": 0.05}
        if not self.aux:
            sae["aux_reconstruction"] = False
        return sae


def sweep_runs() -> list[SweepRun]:
    """The grid in the order it trains: a first point per family, then more sparsity levels for the two
    families the paper compares (SA-GSAE, Gated), the ablation, then the rest, so a partial run already
    compares every family."""
    sa = [SweepRun("SA-GSAE (H)", "sa_gsae", WIDTH, "λ", v) for v in (2.0, 4.0, 1.0)]
    gated = [SweepRun("Gated (2H)", "gated", 2 * WIDTH, "λ", v) for v in (2.0, 4.0, 1.0)]
    jump = [SweepRun("JumpReLU (H)", "jumprelu", WIDTH, "λ", v) for v in (0.5, 0.25, 1.0)]
    topk = [SweepRun("TopK (H)", "topk", WIDTH, "k", v) for v in (32, 16, 64)]
    noaux = [SweepRun("SA-GSAE (H), no aux loss", "sa_gsae", WIDTH, "λ", 2.0, aux=False)]
    return [sa[0], gated[0], topk[0], jump[0], sa[1], gated[1], *noaux, sa[2], gated[2], *topk[1:], *jump[1:]]


def run_sweep(settings: ReportSettings) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per (run, hookpoint) with the stage's evaluation metrics, and the runs left untrained."""
    root = settings.runs_dir / "architectures"
    rows, missing = [], []
    for run in sweep_runs():
        cfg = base_config(settings, name=run.name, hookpoints=HOOKPOINTS, store=str(root / "activations"),
                          sae=run.sae())
        report = train_or_reuse(cfg, root / run.name, settings)
        if report is None:
            missing.append(run.name)
            continue
        for stage in report["stages"]:
            rows.append({"family": run.family, "run": run.name, "knob": run.knob, "value": run.value,
                         "aux": run.aux, "width": run.width, "hookpoint": stage["hookpoint"], **stage["eval"]})
    return rows, missing


def interpolate_at(points: list[tuple[float, float]], x: float) -> float:
    """Linear interpolation in log(L0) between the two sweep points around x; NaN outside their range."""
    points = sorted(p for p in points if p[0] > 0 and not math.isnan(p[1]))
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= x <= x1:
            t = 0.0 if x1 == x0 else (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return math.nan


def families(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["family"] for r in rows if r["aux"]))


def matched(rows: list[dict[str, Any]], hookpoint: str, family: str, key: str, l0: float) -> float:
    points = [(r["l0"], r[key]) for r in rows if r["hookpoint"] == hookpoint and r["family"] == family]
    return interpolate_at(points, l0)


def pareto_table(rows: list[dict[str, Any]], hookpoint: str) -> Table:
    table = Table(["architecture", "width", "sparsity", "L0", "FVE", "dead", "ΔCE (nats)", "CE recovered"])
    for r in rows:
        if r["hookpoint"] == hookpoint:
            table.add([r["family"], r["width"], f"{r['knob']} {r['value']:g}", fmt(r["l0"], 1), fmt(r["fve"]),
                       fmt(r["dead_fraction"]), fmt(r["delta_ce"]), fmt(r["ce_loss_recovered"])])
    return table


def matched_l0(rows: list[dict[str, Any]], hookpoint: str) -> float:
    """Where SA-GSAE and Gated are compared: the geometric middle of the overlap of their L0 ranges at this
    hookpoint (hookpoints answer one λ with very different L0s, so a fixed L0 would miss most of them);
    NaN when either family has fewer than two points or the ranges do not overlap."""
    ranges = []
    for family in PAPER_PAIR:
        l0s = [r["l0"] for r in rows if r["hookpoint"] == hookpoint and r["family"] == family]
        if len(l0s) < 2:
            return math.nan
        ranges.append((min(l0s), max(l0s)))
    low, high = max(r[0] for r in ranges), min(r[1] for r in ranges)
    return math.sqrt(low * high) if 0 < low <= high else math.nan


def matched_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(["hookpoint", "matched L0", "architecture", "FVE", "dead fraction", "ΔCE (nats)"])
    for hookpoint in HOOKPOINTS:
        l0 = matched_l0(rows, hookpoint)
        for family in families(rows):
            table.add([hookpoint, fmt(l0, 1), family, fmt(matched(rows, hookpoint, family, "fve", l0)),
                       fmt(matched(rows, hookpoint, family, "dead_fraction", l0)),
                       fmt(matched(rows, hookpoint, family, "delta_ce", l0))])
    return table


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """Claim-by-claim comparison with the paper, computed from the rows (never written by hand)."""
    lines = []
    for hookpoint in HOOKPOINTS:
        l0 = matched_l0(rows, hookpoint)
        sa = {k: matched(rows, hookpoint, PAPER_PAIR[0], k, l0) for k in ("fve", "dead_fraction")}
        gated = {k: matched(rows, hookpoint, PAPER_PAIR[1], k, l0) for k in ("fve", "dead_fraction")}
        if any(math.isnan(v) for v in (l0, *sa.values(), *gated.values())):
            lines.append(f"- `{hookpoint}`: the SA-GSAE and Gated sweeps do not overlap in L0 (no verdict).")
            continue
        fve_word = "matches or beats" if sa["fve"] >= gated["fve"] - 0.005 else "falls short of"
        dead_gap = gated["dead_fraction"] - sa["dead_fraction"]
        lines.append(
            f"- `{hookpoint}` at L0 {l0:.1f}: SA-GSAE (H) {fve_word} Gated (2H) on FVE "
            f"({sa['fve']:.3f} vs {gated['fve']:.3f}); dead fraction {sa['dead_fraction']:.3f} vs "
            f"{gated['dead_fraction']:.3f} ({dead_gap:+.3f} in SA-GSAE's favour; paper: 0.35–0.62 lower).")
    for r in rows:
        if not r["aux"]:
            with_aux = [x for x in rows if x["run"] == r["run"].replace("-noaux", "") and
                        x["hookpoint"] == r["hookpoint"]]
            if with_aux:
                w = with_aux[0]
                lines.append(
                    f"- No-aux ablation, `{r['hookpoint']}`: dead fraction {r['dead_fraction']:.3f} vs "
                    f"{w['dead_fraction']:.3f} with the auxiliary loss, FVE {r['fve']:.3f} vs {w['fve']:.3f}, "
                    f"L0 {r['l0']:.1f} vs {w['l0']:.1f} (paper: ~98% dead without it).")
    return lines


def plot_pareto(rows: list[dict[str, Any]], out: Path) -> None:
    """FVE against L0, one panel per hookpoint, one line per architecture family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(HOOKPOINTS), figsize=(5 * len(HOOKPOINTS), 4), sharey=False)
    for ax, hookpoint in zip(axes, HOOKPOINTS, strict=True):
        for family in dict.fromkeys(r["family"] for r in rows):
            pts = sorted((r["l0"], r["fve"]) for r in rows if r["hookpoint"] == hookpoint and r["family"] == family)
            ax.plot(*zip(*pts, strict=True), marker="o" if len(pts) > 1 else "x", label=family)
        ax.set_xscale("log")
        ax.set_xlabel("L0")
        ax.set_ylabel("FVE")
        ax.set_title(hookpoint)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def section(settings: ReportSettings, img_dir: Path, img_rel: str) -> str:
    rows, missing = run_sweep(settings)
    plot_pareto(rows, img_dir / "architectures_pareto.png")
    parts = [
        "## 1. SA-GSAE vs Gated (2H) vs JumpReLU / TopK: sparsity sweep at three mid-depth hookpoints",
        "",
        f"Gemma 3 270M, `{'`, `'.join(HOOKPOINTS)}`; one plain 3-stage stack per run (all runs read one shared "
        f"activation store, identical batches); {settings.train_tokens:,} training tokens "
        f"({settings.train_tokens // 512} steps of 512), width H = {WIDTH} (Gated 2H = {2 * WIDTH}), seed "
        f"{settings.seed}, one seed per point; evaluation on {settings.eval_tokens:,} held-out tokens, CE/KL on "
        f"{settings.ce_windows} windows. Published comparison (docs/methods.md §B): half-width SA-GSAE matches or "
        "Pareto-dominates full-width Gated SAEs with 0.35–0.62 lower dead fraction (Pythia/SmolLM3), and ~98% "
        "dead latents without the auxiliary loss.",
        "",
        f"![FVE vs L0]({img_rel}/architectures_pareto.png)",
        "",
        *missing_note(missing),
    ]
    for hookpoint in HOOKPOINTS:
        parts += [f"### `{hookpoint}`", "", pareto_table(rows, hookpoint).render(), ""]
    parts += ["### At matched L0 (interpolated in log L0 between each family's sweep points; – = outside its "
              "range)", "",
              matched_table(rows).render(), "", "### Against the paper", "", *verdicts(rows), ""]
    return "\n".join(parts)
