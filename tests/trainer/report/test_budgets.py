"""Section 1b's pieces that need no training: the run grid and its configs, matched-L0 comparison per budget,
the verdict on how the gap moves with budget, the curves' table, and the CLI's budget list."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

import trainer.report as report
from trainer.cli import _budget_list, main
from trainer.report import budgets
from trainer.report.runs import ReportSettings

SETTINGS = ReportSettings(runs_dir=Path("runs/x"), budgets=(400_000, 100_000), budget_store_tokens=200_000)


def _row(family: str, l0: float, fve: float, dead: float, *, budget: int, seed: int = 0, aux: bool = True,
         run: str = "r", history: list | None = None) -> dict:
    return {"family": family, "l0": l0, "fve": fve, "dead_fraction": dead, "dead_in_training": math.nan,
            "delta_ce": 0.1, "aux": aux,
            "budget": budget, "seed": seed, "run": run, "knob": "λ", "value": 2.0, "history": history or [],
            "seconds": 60.0}


def _pair(budget: int, sa_fve: float, gated_fve: float, seed: int = 0) -> list[dict]:
    return [_row("SA-GSAE (H)", 8, sa_fve - 0.05, 0.05, budget=budget, seed=seed),
            _row("SA-GSAE (H)", 64, sa_fve + 0.05, 0.01, budget=budget, seed=seed),
            _row("Gated (2H)", 16, gated_fve - 0.05, 0.40, budget=budget, seed=seed),
            _row("Gated (2H)", 128, gated_fve + 0.10, 0.20, budget=budget, seed=seed)]


def test_grid_runs_smallest_budget_first_then_the_second_seed_of_the_pair():
    runs = budgets.budget_runs(SETTINGS)
    assert [r.budget for r in runs[:10]] == [100_000] * 10 and runs[10].budget == 400_000
    assert not any(r.sweep.architecture == "jumprelu" for r in runs)
    second = [r for r in runs if r.seed == budgets.SECOND_SEED]
    assert {r.budget for r in second} == {400_000}
    assert {r.sweep.family for r in second} == {"SA-GSAE (H)", "Gated (2H)"} and all(r.sweep.aux for r in second)
    assert len({r.name for r in runs}) == len(runs)  # every run has its own directory
    assert budgets.budget_runs(ReportSettings()) == []


def test_budget_configs_share_one_store_and_differ_in_budget_seed_and_history():
    runs = budgets.budget_runs(SETTINGS)
    small, large = (budgets.budget_config(SETTINGS, r) for r in (runs[0], runs[10]))
    seeded = budgets.budget_config(SETTINGS, next(r for r in runs if r.seed == budgets.SECOND_SEED))
    assert small.activations == large.activations == seeded.activations  # one store, collected once
    assert small.activations.max_tokens == 200_000
    assert small.collection_fingerprint() == seeded.collection_fingerprint()
    assert (small.training.token_budget, large.training.token_budget) == (100_000, 400_000)
    assert seeded.training.seed == budgets.SECOND_SEED and small.training.seed == 0
    assert small.training.history_every == budgets.HISTORY_EVERY
    assert small.training.history_windows == budgets.DEAD_WINDOWS
    assert small.stack.hookpoints == (budgets.HOOKPOINT,)


def test_matched_comparison_per_budget_and_the_trend_verdict():
    rows = _pair(100_000, 0.80, 0.85) + _pair(400_000, 0.843, 0.86) + _pair(400_000, 0.82, 0.86, seed=1)
    pair = budgets.pair_at_matched_l0(budgets._select(rows, 100_000, 0))
    assert pair["l0"] == pytest.approx(math.sqrt(16 * 64))
    assert pair["sa_fve"] == pytest.approx(0.75 + 0.10 * 2 / 3)  # log-L0 interpolation between 8 and 64 at 32
    lines = budgets.verdicts(rows, [100_000, 400_000])
    claim = next(line for line in lines if "Claim" in line)
    assert "closes with budget" in claim and "seed 0" in claim and "-0.033, -0.000" in claim
    matched = [line for line in lines if "400,000 tokens, seed" in line and "FVE SA-GSAE" in line]
    assert len(matched) == 2  # both seeds at the largest budget
    table = budgets.matched_table(rows, [100_000, 400_000]).render()
    assert table.count("| 400,000 | 1 |") == 2


@pytest.mark.parametrize(("gaps", "word"), [
    ([-0.05, 0.02], "reverses"), ([-0.05, -0.002], "closes"), ([-0.05, -0.02], "narrows"),
    ([-0.02, -0.05], "does not close"), ([0.0, 0.01], "within the tolerance"), ([math.nan], "cannot be told"),
])
def test_gap_trend_words(gaps, word):
    assert word in budgets.gap_trend(gaps)


def test_noaux_verdict_and_the_dead_fraction_curves():
    history = [{"tokens": t, "dead_over_100000": None if t < 100_000 else t / 1e6, "dead_over_1000000": None}
               for t in range(10_240, 409_600, 10_240)]
    rows = [_row("SA-GSAE (H)", 20, 0.9, 0.1, budget=400_000, run="sa_gsae-w1024-lambda2-t400000-seed0",
                 history=history),
            _row("SA-GSAE (H), no aux loss", 5, 0.7, 0.6, budget=400_000, aux=False,
                 run="sa_gsae-noaux-w1024-lambda2-t400000-seed0", history=history)]
    (line,) = [x for x in budgets.verdicts(rows, [400_000]) if "No-aux" in x]
    assert "dead fraction 0.600 vs 0.100 with the auxiliary loss on the 4,096 evaluation tokens, – vs –" in line
    assert "| 12.0 |" in budgets.sweep_table([{**rows[0], "dead_in_training": 0.25, "l0": 12.0}]).render()
    curves = budgets.curve_runs(rows)
    assert [r["aux"] for r in curves] == [False, True]  # the ablation first, then its twin (no Gated run here)
    table = budgets.curve_table(curves, points=3).render().splitlines()
    assert len(table) == 2 + 3 and table[2].startswith("| 10,240 | – |")  # before the window is filled: no value


def test_comparison_table_escapes_pipes():
    rendered = budgets.comparison_table().render()
    assert all(len(re.findall(r"(?<!\\)\|", line)) == 5 for line in rendered.splitlines())  # 4 cells each
    assert "\\|φ(π)_i\\|" in rendered


def test_budget_list_and_section_errors(tmp_path, capsys):
    assert _budget_list("100000, 400_000,100000") == (100_000, 400_000)
    with pytest.raises(ValueError, match="comma-separated token counts"):
        _budget_list("100k")
    with pytest.raises(ValueError, match="at least one batch of 512"):
        _budget_list("100")
    with pytest.raises(ValueError, match="section 1b needs the training budgets"):
        report.build_report(tmp_path / "r.md", ReportSettings(runs_dir=tmp_path), ["1b"])
    assert main(["report", "--out", str(tmp_path / "r.md"), "--runs", str(tmp_path), "--sections", "1b",
                 "--budgets", "12"]) != 0
    assert "at least one batch" in capsys.readouterr().err


def test_section_without_budgets_keeps_the_cached_one(tmp_path, monkeypatch):
    cache = tmp_path / "sections"
    cache.mkdir()
    (cache / "1b-budgets.md").write_text("## 1b. cached\n")
    assert budgets.section(ReportSettings(runs_dir=tmp_path), tmp_path, "img") is None
    monkeypatch.setattr(report, "_sections", lambda: {"1b": ("budgets", budgets.section)})
    out = report.build_report(tmp_path / "r.md", ReportSettings(runs_dir=tmp_path))  # every section, no budgets
    assert "## 1b. cached" in out.read_text()


def test_plots_are_written(tmp_path):
    history = [{"tokens": t, "dead_over_100000": 0.1, "dead_over_1000000": None} for t in (10_240, 102_400, 204_800)]
    rows = _pair(100_000, 0.8, 0.85) + _pair(400_000, 0.85, 0.86) + _pair(400_000, 0.84, 0.86, seed=1)
    rows.append(_row("SA-GSAE (H), no aux loss", 5, 0.7, 0.6, budget=400_000, aux=False,
                     run="sa_gsae-noaux-w1024-lambda2-t400000-seed0", history=history))
    budgets.plot_budgets(rows, [100_000, 400_000], tmp_path / "pareto.png")
    budgets.plot_dead_curves(budgets.curve_runs(rows), tmp_path / "dead.png")
    for name in ("pareto.png", "dead.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_lambda_comparison_names_the_dominating_family():
    rows = [_row("SA-GSAE (H)", 14.0, 0.75, 0.1, budget=400_000), _row("Gated (2H)", 15.0, 0.78, 0.5, budget=400_000)]
    (line,) = budgets.same_lambda_lines(rows, 400_000, 0)
    assert "both at λ 2" in line and "neither dominates" in line
    rows[1]["l0"] = 13.0
    assert "Gated dominates" in budgets.same_lambda_lines(rows, 400_000, 0)[0]
    rows[0]["fve"] = 0.80
    rows[1]["l0"] = 15.0
    assert "SA-GSAE dominates" in budgets.same_lambda_lines(rows, 400_000, 0)[0]
    lines = budgets.verdicts(rows, [400_000])
    assert any("no matched-L0 comparison" in x for x in lines) and any("cannot be told" in x for x in lines)


def test_dominance_counts_points_beaten_without_an_l0_overlap():
    rows = [_row("SA-GSAE (H)", 86.0, 0.77, 0.4, budget=400_000), _row("SA-GSAE (H)", 91.0, 0.62, 0.5, budget=400_000),
            _row("Gated (2H)", 6.0, 0.83, 0.6, budget=400_000), _row("Gated (2H)", 20.0, 0.89, 0.1, budget=400_000)]
    (line,) = budgets.dominance_line(rows, 400_000, 0)
    assert "2 of 2 SA-GSAE (H) points are dominated" in line and "0 of 2 Gated points" in line
    assert budgets.dominance_line(rows[:2], 400_000, 0) == []
