"""Report section 5: the demo stack that `make demo` serves (residualized SA-GSAE with error predictors),
as trained by trainer/configs/demo.toml."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.evaluation.compare import stack_summary
from trainer.report import corpus_sources
from trainer.report.markdown import Table, fmt
from trainer.report.runs import ReportSettings, missing_note, train_or_reuse
from trainer.training.config import load_config

CONFIG = Path("trainer/configs/demo.toml")
RUN = Path("runs/demo")


def stage_table(summary: dict[str, Any], predictors: list[dict[str, Any]]) -> Table:
    table = Table(["stage", "kind", "FVE", "FVE on residual target", "L0", "dead", "ΔCE spliced",
                   "error-norm probe R²", "… with previous stage", "error-vector probe R²"])
    for stage, predictor in zip(summary["stages"], predictors, strict=True):
        m = stage["metrics"]
        table.add([stage["hookpoint"], "residual" if stage["residual_of"] is not None else "plain",
                   fmt(m.get("fve")), fmt(m.get("residual_fve")), fmt(m.get("l0"), 1), fmt(m.get("dead_fraction")),
                   fmt(m.get("delta_ce")), fmt(predictor.get("norm_r2")), fmt(predictor.get("prev_r2")),
                   fmt(predictor.get("vector_r2"))])
    return table


def _predictor_records(stack_dir: Path, stages: int) -> list[dict[str, Any]]:
    import json

    manifest = json.loads((stack_dir / "stack.json").read_text())
    return [dict(s.get("error_predictor") or {}) for s in manifest["stages"]][:stages]


def section(settings: ReportSettings) -> str:
    cfg = load_config(CONFIG)
    report = train_or_reuse(cfg, RUN, settings)
    if report is None:
        return "## 5. The demo stack (`make demo`)\n\n" + "\n".join(missing_note([str(RUN)])) + "\n\n" + \
            corpus_sources.section()
    stack_dir = Path(report["stack"])
    summary = stack_summary(stack_dir)
    metrics = summary["metrics"]
    return "\n".join([
        "## 5. The demo stack (`make demo`)",
        "",
        "```sh",
        "featurewire-train train --config trainer/configs/demo.toml --out runs/demo   # what make demo-stack runs",
        "```",
        "",
        f"Gemma 3 270M, `{'`, `'.join(cfg.stack.hookpoints)}`, residualized {cfg.sae.architecture} width "
        f"{cfg.sae.width}, λ per stage {list(cfg.sae.sparsity_coefficients) or cfg.sae.sparsity_coefficient}, "
        f"{report['activation_tokens']:,} training tokens, seed {cfg.training.seed}. Error predictors are fitted "
        "on held-out calibration tokens and scored on a fifth of them that the fit never saw (R² columns); "
        "the service reports the norm probe's prediction next to every actual error norm.",
        "",
        stage_table(summary, _predictor_records(stack_dir, len(summary["stages"]))).render(),
        "",
        f"All stages replaced at once, online: ΔCE {fmt(metrics.get('multi_online_delta_ce'))} nats, KL "
        f"{fmt(metrics.get('multi_online_kl'))}, CE recovered {fmt(metrics.get('multi_online_ce_loss_recovered'))} "
        f"(clean CE {fmt(metrics.get('ce_clean'))}).",
        "",
        corpus_sources.section(),
    ])
