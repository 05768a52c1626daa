"""The report's pieces that need no training: tables, matched-L0 interpolation, verdicts computed from
rows, run reuse by settings, and assembly of cached sections."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import trainer.report as report
from trainer.report import architectures
from trainer.report.markdown import Table, fmt
from trainer.report.runs import ReportSettings, base_config, finished_report, missing_note, train_or_reuse


def test_table_renders_and_checks_width():
    table = Table(["a", "b"])
    table.add(["x", 0.12345])
    assert table.render().splitlines() == ["| a | b |", "| --- | ---: |", "| x | 0.123 |"]
    with pytest.raises(ValueError, match="header has 2"):
        table.add([1])
    assert fmt(float("nan")) == "–" and fmt(None) == "–" and fmt(1234) == "1,234"


def test_interpolation_is_linear_in_log_l0_and_nan_outside():
    points = [(10.0, 0.8), (40.0, 0.9)]
    assert architectures.interpolate_at(points, 20.0) == pytest.approx(0.85)
    assert architectures.interpolate_at(points, 10.0) == pytest.approx(0.8)
    assert math.isnan(architectures.interpolate_at(points, 50.0))
    assert math.isnan(architectures.interpolate_at([(10.0, 0.8)], 10.5))


def _row(family: str, hookpoint: str, l0: float, fve: float, dead: float, *, aux: bool = True,
         run: str = "r") -> dict:
    return {"family": family, "hookpoint": hookpoint, "l0": l0, "fve": fve, "dead_fraction": dead, "aux": aux,
            "run": run}


def test_verdicts_compare_at_the_middle_of_the_overlapping_l0_ranges():
    hp = architectures.HOOKPOINTS[0]
    rows = [_row("SA-GSAE (H)", hp, 8, 0.80, 0.05), _row("SA-GSAE (H)", hp, 64, 0.95, 0.02),
            _row("Gated (2H)", hp, 16, 0.85, 0.30), _row("Gated (2H)", hp, 128, 0.97, 0.20)]
    assert architectures.matched_l0(rows, hp) == pytest.approx(32.0)  # overlap 16..64
    lines = architectures.verdicts(rows)
    first = next(line for line in lines if hp in line)
    assert "at L0 32.0" in first and "in SA-GSAE's favour" in first
    assert "matches or beats Gated (2H) on FVE (0.900 vs 0.890)" in first
    assert any("do not overlap" in line for line in lines)  # the other hookpoints have no rows
    assert math.isnan(architectures.matched_l0(rows[:3], hp))  # Gated has a single point


def test_noaux_verdict_pairs_with_its_aux_run():
    hp = architectures.HOOKPOINTS[1]
    rows = [_row("SA-GSAE (H)", hp, 20, 0.9, 0.1, run="sa_gsae-w1024-lambda2"),
            _row("SA-GSAE (H), no aux loss", hp, 5, 0.7, 0.9, aux=False, run="sa_gsae-noaux-w1024-lambda2")]
    (line,) = [x for x in architectures.verdicts(rows) if "No-aux" in x]
    assert "0.900 vs 0.100" in line


def test_sweep_run_names_are_ascii_and_distinct():
    names = [run.name for run in architectures.sweep_runs()]
    assert len(set(names)) == len(names) and all(n.isascii() for n in names)
    noaux = [r for r in architectures.sweep_runs() if not r.aux]
    assert noaux and noaux[0].sae()["aux_reconstruction"] is False


def test_finished_runs_are_reused_only_with_the_same_settings(tmp_path: Path):
    settings = ReportSettings(runs_dir=tmp_path, train_missing=False)
    cfg = base_config(settings, name="x", hookpoints=["blocks.0.hook_resid_post"], store="s",
                      sae={"architecture": "topk", "width": 64})
    assert finished_report(tmp_path, cfg) is None
    assert train_or_reuse(cfg, tmp_path, settings) is None  # nothing trains when switched off
    assert "`x`" in missing_note(["x"])[0] and missing_note([]) == []
    (tmp_path / "report.json").write_text(json.dumps({"config": cfg.to_dict(), "stages": []}))
    assert finished_report(tmp_path, cfg) is not None
    other = base_config(settings, name="x", hookpoints=["blocks.0.hook_resid_post"], store="s",
                        sae={"architecture": "topk", "width": 128})
    assert finished_report(tmp_path, other) is None


def test_build_report_regenerates_chosen_sections_and_reuses_the_rest(tmp_path: Path, monkeypatch):
    calls: list[str] = []

    def make(key: str):
        def section(settings, img_dir, img_rel):
            calls.append(key)
            return f"## section {key} ({img_rel})\n"
        return section

    monkeypatch.setattr(report, "_sections", lambda: {"1": ("a", make("1")), "2": ("b", make("2"))})
    out = tmp_path / "docs" / "results.md"
    out.parent.mkdir()
    settings = ReportSettings(runs_dir=tmp_path / "runs")
    text = report.build_report(out, settings, ["1"]).read_text()
    assert calls == ["1"] and "## section 1 (img)" in text and "Not generated yet" in text
    report.build_report(out, settings, ["2"])
    text = out.read_text()
    assert calls == ["1", "2"] and "## section 1" in text and "## section 2" in text
    with pytest.raises(ValueError, match="unknown section"):
        report.build_report(out, settings, ["9"])

    summary = f"{report.SUMMARY_START}\n## Summary\n\n| claim | verdict |\n{report.SUMMARY_END}\n"
    out.write_text(text.replace("## section 1", summary + "\n## section 1", 1))
    report.build_report(out, settings, ["1"])
    kept = out.read_text()
    assert kept.count("| claim | verdict |") == 1 and kept.index("## Summary") < kept.index("## section 1")
