"""Report section 6 rendered from real records measured on the tiny Gemma's planted-feature stack."""

from __future__ import annotations

import pytest

from core.stack.reader import read_stack
from tests.trainer.steerability.test_build import PLANTED, planted_stack
from trainer.report.runs import ReportSettings
from trainer.report.steerability import TITLE, render, roc_auc, section
from trainer.steerability.build import Selection, read_openings, run_steerability
from trainer.steerability.measure import SteerSettings
from trainer.steerability.schedule import parse_strengths


def test_roc_auc_counts_pairs_and_ties():
    assert roc_auc([0.9, 0.1, 0.5], [True, False, False]) == 1.0
    assert roc_auc([0.1, 0.9], [True, False]) == 0.0
    assert roc_auc([0.5, 0.5], [True, False]) == 0.5
    assert roc_auc([0.5, 0.7], [True, True]) is None


def test_the_section_reports_the_measured_records(tiny_gemma, tmp_path):
    stack, token = planted_stack(tiny_gemma, tmp_path / "stack", dashboards=True)
    settings = SteerSettings(tuple(parse_strengths(["add:max:4,16", "set:max:16", "add:norm:1"])), max_new_tokens=6,
                             samples=0)
    run_steerability(stack, tiny_gemma, [Selection(0, (PLANTED, 3, 5))], settings, read_openings()[:3],
                     progress=False)
    loaded = read_stack(stack)
    records = loaded.stages[0].steerability["features"]
    text = render(loaded.stages, tiny_gemma.tokenizer, "tiny sample")
    steering = sum(r["verdict"]["steers"] for r in records.values())
    assert text.startswith(TITLE) and "tiny sample" in text
    assert f"| embed | plain | 3 | {steering} |" in text
    assert f"`embed` #{PLANTED}" in text and repr(tiny_gemma.tokenizer.decode([token])) in text
    assert "| add:max |" in text and "| set:max |" in text and "| add:norm |" in text
    assert "ROC AUC" in text


def test_without_the_demo_stack_the_section_says_so(tmp_path):
    text = section(ReportSettings(runs_dir=tmp_path), stack_dir=tmp_path / "missing")
    assert "not built yet" in text and "make demo-stack" in text


@pytest.mark.parametrize("stages", [[]])
def test_no_records_names_the_command(stages, tiny_gemma):
    assert "featurewire-train steerability --stack runs/demo/stack" in render(stages, tiny_gemma.tokenizer, "")
