"""Report section 4 without training: its joint runs use λ₂ on the paper's per-dimension scale, runs stored
under the retired `lambda` are not reused, and the verdict lines are computed from the rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.report import architectures, meta
from trainer.report.runs import ReportSettings, finished_report
from trainer.training.meta_sae import penalty_weight


def test_joint_runs_use_the_papers_lambda_scale(tmp_path: Path):
    configs = meta._configs(ReportSettings(runs_dir=tmp_path))
    assert [name for name, _, _ in configs] == list(meta.RUNS)
    sections = {name: cfg.meta_sae for name, cfg, _ in configs}
    assert sections["solo"] is None
    paper = sections[meta.run_label(0.3)]
    assert paper is not None and paper.lambda_per_dim == 0.3 and paper.sigma2 == 1.0
    assert penalty_weight(paper, 640) == pytest.approx(192.0)  # what the old "λ·d" row used at d = 640
    assert len({out for _, _, out in configs}) == len(configs)
    solo = configs[0][1]
    assert all((cfg.collection_fingerprint(), cfg.sae, cfg.training) == (solo.collection_fingerprint(), solo.sae,
                                                                          solo.training) for _, cfg, _ in configs)


def test_a_run_stored_under_the_retired_lambda_is_not_reused(tmp_path: Path):
    _, cfg, out = meta._configs(ReportSettings(runs_dir=tmp_path))[-1]
    out.mkdir(parents=True)
    stored = cfg.to_dict()
    (out / "report.json").write_text(json.dumps({"config": stored, "stages": []}))
    assert finished_report(out, cfg) is not None
    old = dict(stored["meta_sae"])
    old["lambda_"] = old.pop("lambda_per_dim")  # how a run trained before the rename stored its config
    (out / "report.json").write_text(json.dumps({"config": {**stored, "meta_sae": old}, "stages": []}))
    assert finished_report(out, cfg) is None  # retrained, never read as λ₂


def _metrics(phi: float, mse: float, post_hoc: float) -> dict:
    return {"fve": 0.8, "l0": 32.0, "dead_fraction": 0.0, "delta_ce": 0.1, "mse": mse, "heldout_mean_abs_phi": phi,
            "heldout_phi_noise_floor": 0.001, "meta_fve_post_hoc": post_hoc}


def test_verdicts_and_table_are_computed_from_the_rows():
    hp = architectures.HOOKPOINTS[0]
    rows = [{"hookpoint": hp, "d_in": 640, "solo": _metrics(0.02, 100.0, 0.26),
             meta.run_label(0.3): _metrics(0.017, 125.0, 0.23), meta.run_label(0.1): _metrics(0.0199, 101.0, 0.25)}]
    lines = meta.verdicts(rows)
    assert len(lines) == 2 and lines[0].startswith(f"- `{hp}`, meta λ₂ 0.1: mean |φ| -0.5% (paper -3.8%)")
    assert "is within the independent-latent noise floor" in lines[0]
    assert "mean |φ| -15.0% (paper -7.5%), the gap 0.00300 is above" in lines[1]
    assert "reconstruction MSE +25.0% (paper L2 +9.3%)" in lines[1] and "0.260 solo vs 0.230" in lines[1]
    rendered = meta.table(rows).render().splitlines()
    assert [line.split(" | ")[1] for line in rendered[2:]] == list(meta.RUNS)
    rows[0].pop(meta.run_label(0.1))
    assert len(meta.verdicts(rows)) == 1  # a joint run not trained yet is left out


def test_section_lists_the_runs_it_still_needs(tmp_path: Path):
    text = meta.section(ReportSettings(runs_dir=tmp_path, train_missing=False), tmp_path, "img")
    assert text.startswith("## 4. Meta-SAE regularised training vs the solo SAE")
    assert "`joint-lpd0.3`" in text and "`joint-lpd0.1`" in text and f"`topk-w{meta.WIDTH}-k{meta.K}`" in text
