"""Training runs behind the research report: configs built in code from one base, trained once, reused.

A report regenerates in minutes when its runs exist: `train_or_reuse` returns a finished run's report.json
when the run was trained with the same settings (the stored config, read back with today's defaults,
has the same fingerprint), and otherwise trains it (resuming from its checkpoint when one matches).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.training.config import TrainConfig, config_from_dict

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportSettings:
    """What every report experiment shares; the tables print these so a reader knows the budget."""

    runs_dir: Path = Path("runs/report")
    model: str = "default"
    train_tokens: int = 100_000
    """Activation tokens collected per hookpoint for training (one pass)."""
    eval_tokens: int = 4_096
    ce_windows: int = 8
    seed: int = 0
    progress: bool = False
    train_missing: bool = True
    """False: report only runs that already finished (sections list the ones missing)."""
    budgets: tuple[int, ...] = ()
    """Training budgets (tokens) of section 1b's budget axis; empty: section 1b is not regenerated."""
    budget_store_tokens: int = 200_000
    """Tokens collected once for section 1b; larger budgets make several shuffled passes over them."""


def base_config(settings: ReportSettings, *, name: str, hookpoints: list[str], store: str,
                sae: dict[str, Any], training: dict[str, Any] | None = None,
                stack: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> TrainConfig:
    """One report run: the shared corpus/activation/training settings plus this run's SAE section."""
    data: dict[str, Any] = {
        "model": {"name": settings.model, "dtype": "float32"},
        "corpus": {"spec": "default", "calibration_fraction": 0.1},
        "activations": {"context_length": 128, "batch_size": 8, "max_tokens": settings.train_tokens,
                        "store": store},
        "stack": {"name": name, "hookpoints": hookpoints, **(stack or {})},
        "sae": sae,
        "training": {"batch_size": 512, "lr": 1e-3, "warmup_steps": 20, "sparsity_warmup_steps": 60,
                     "buffer_tokens": 65_536, "dead_after_tokens": 50_000, "checkpoint_every": 100,
                     "seed": settings.seed, **(training or {})},
        "eval": {"max_tokens": settings.eval_tokens, "ce_windows": settings.ce_windows},
    }
    for section, values in (extra or {}).items():
        data[section] = {**data.get(section, {}), **values}
    return config_from_dict(data)


def _same_settings(stored: dict[str, Any], cfg: TrainConfig) -> bool:
    try:
        return config_from_dict(copy.deepcopy(stored)).fingerprint() == cfg.fingerprint()
    except (TypeError, ValueError):
        return False


def finished_report(out_dir: Path, cfg: TrainConfig) -> dict[str, Any] | None:
    """The run's report.json when it finished with these settings, else None."""
    path = out_dir / "report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    return report if _same_settings(report.get("config", {}), cfg) else None


def train_or_reuse(cfg: TrainConfig, out_dir: Path, settings: ReportSettings) -> dict[str, Any] | None:
    """A finished run's report (trained now when missing or stale; None when training is switched off)."""
    report = finished_report(out_dir, cfg)
    if report is not None:
        logger.info("reusing %s", out_dir)
        return report
    if not settings.train_missing:
        logger.info("not trained, skipped: %s", out_dir)
        return None
    from trainer.training.loop import run_training  # torch and the host model load only when something trains

    logger.info("training %s", out_dir)
    return run_training(cfg, out_dir, progress=settings.progress).report


def missing_note(missing: list[str]) -> list[str]:
    """A line naming the runs a report left out because they were not trained."""
    if not missing:
        return []
    return [f"Not trained yet, so not in this section: {', '.join(f'`{m}`' for m in missing)} "
            "(`featurewire-train report` without `--no-train` trains them).", ""]
