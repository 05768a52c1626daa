"""The training pipeline end to end on the tiny model: CLI train → stack → eval, resume, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.stack.reader import read_stack
from trainer.cli import main
from trainer.training.config import config_from_dict, load_config
from trainer.training.loop import run_training

SMOKE = Path(__file__).resolve().parents[3] / "trainer" / "configs" / "smoke.toml"


def test_smoke_train_then_eval_through_the_cli(tmp_path, capsys):
    assert main(["train", "--config", str(SMOKE), "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "stack:" in out and "phases:" in out
    phases = json.loads((tmp_path / "report.json").read_text())["phases"]
    assert list(phases) == ["model load", "corpus (and generation)", "collection", "training", "evaluation"]
    assert all(seconds >= 0 for seconds in phases.values())
    for name in phases:
        assert f"  {name}" in out
    stack = read_stack(tmp_path / "stack")
    assert [s.hookpoint for s in stack.stages] == ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"]
    for stage in stack.stages:
        assert stage.metrics["l0"] == pytest.approx(8.0)  # TopK k = 8
        assert 0.0 < stage.metrics["fve"] < 1.0 and stage.metrics["ce_positions"] > 0
        assert stage.input_scale > 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] == 16384 // 256
    first = report["stages"][0]["training"]
    assert first["fve"] > 0.2  # the loss fell enough to explain a real share of the variance

    assert main(["eval", "--stack", str(tmp_path / "stack"), "--max-tokens", "256", "--ce-windows", "4",
                 "--report", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["stages"][0]["eval"]["tokens"] >= 256
    assert read_stack(tmp_path / "stack").stages[0].metrics["tokens"] == evaluated["stages"][0]["eval"]["tokens"]


def _small(architecture: str = "jumprelu") -> dict:
    data = {k: dict(v) for k, v in __import__("tomllib").loads(SMOKE.read_text()).items()}
    data["sae"] = {"architecture": architecture, "expansion_factor": 2, "sparsity_coefficient": 0.01}
    data["training"].update(token_budget=4096, checkpoint_every=4, dead_after_tokens=512)
    data["activations"]["max_tokens"] = 2048
    data["eval"] = {"max_tokens": 128, "ce_windows": 4}
    return data


def test_an_interrupted_run_resumes_to_the_same_result(tmp_path):
    config = config_from_dict(_small())

    def interrupt(step: int) -> None:
        if step == 9:  # after the checkpoint written at step 8
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(config, tmp_path / "resumed", progress=False, on_step=interrupt)
    assert json.loads((tmp_path / "resumed" / "checkpoint" / "checkpoint.json").read_text())["step"] == 8
    resumed = run_training(config, tmp_path / "resumed", progress=False)
    straight = run_training(config, tmp_path / "straight", progress=False)
    for a, b in zip(read_stack(resumed.stack_dir).stages, read_stack(straight.stack_dir).stages, strict=True):
        for name, tensor in a.sae.state_dict().items():
            assert torch.equal(tensor, b.sae.state_dict()[name]), name


def test_a_checkpoint_from_another_config_is_refused(tmp_path):
    run_training(config_from_dict(_small()), tmp_path, progress=False)
    other = _small()
    other["training"]["lr"] = 1e-2
    with pytest.raises(ValueError, match="different config"):
        run_training(config_from_dict(other), tmp_path, progress=False)


def test_config_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[stack]\nhookpoints = ["blocks.1.hook_resid_post"]\n[sae]\nwidht = 3\n')
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['widht'\] in \[sae\]; allowed: .*width"):
        load_config(bad)
    bad.write_text("[stack]\nname = 'x'\n")
    with pytest.raises(ValueError, match="stack.hookpoints must name at least one hookpoint"):
        load_config(bad)
    bad.write_text('[stack]\nhookpoints = ["blocks.1.hook_resid_post"]\n[sae]\narchitecture = "magic"\n')
    with pytest.raises(ValueError, match="unknown; choose one of relu, topk"):
        load_config(bad)
    assert main(["train", "--config", str(tmp_path / "missing.toml"), "--out", str(tmp_path)]) == 2


def test_sweep_shares_one_activation_store_and_compares_runs(tmp_path, capsys):
    configs = tmp_path / "configs"
    configs.mkdir()
    store = tmp_path / "store"
    for architecture in ("topk", "sa_gsae"):
        data = _small(architecture)
        data["activations"]["store"] = str(store)
        data["training"]["token_budget"] = 1024
        lines = [f"[{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
                 for section, values in data.items()]
        (configs / f"{architecture}.toml").write_text("\n".join(lines))
    assert main(["sweep", "--configs", str(configs), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    rows = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [(r["run"], r["architecture"]) for r in rows] == [("sa_gsae", "sa_gsae")] * 2 + [("topk", "topk")] * 2
    assert all(r["fve"] <= 1 and r["tokens"] >= 128 and r["ce_positions"] > 0 for r in rows)
    assert not (tmp_path / "out" / "topk" / "activations").exists()  # both runs read the shared store
    assert "sa_gsae blocks.1.hook_resid_post" in capsys.readouterr().out


def test_every_shipped_config_is_valid():
    shipped = sorted(SMOKE.parent.rglob("*.toml"))
    assert {p.stem for p in shipped} >= {"smoke", "demo", "topk", "sa_gsae_half"}
    for path in shipped:
        config = load_config(path)
        assert config.stack.hookpoints, path


def test_batchtopk_is_served_with_a_threshold_calibrated_to_k(tmp_path):
    data = _small("batchtopk")
    data["sae"]["k"] = 8
    result = run_training(config_from_dict(data), tmp_path, progress=False)
    for stage in result.report["stages"]:
        assert stage["eval"]["l0"] == pytest.approx(8, rel=0.1)  # held-out: 7.8-8.0 here, 6.5-6.8 uncalibrated


def test_a_residualized_stack_trains_evaluates_and_compares_with_a_plain_one(tmp_path, capsys):
    data = _small("topk")
    data["sae"] = {"architecture": "topk", "expansion_factor": 2, "k": 4}
    data["stack"] = {**data["stack"], "residualize": True, "calibration_tokens": 2048}
    result = run_training(config_from_dict(data), tmp_path, progress=False)
    stack = read_stack(result.stack_dir)
    first, second = stack.stages
    assert first.residual_of is None and first.affine is None
    assert second.residual_of == 0 and second.affine is not None
    assert second.input_scale == pytest.approx(second.affine.residual_scale)
    assert result.report["affine_maps"][0]["r2_held_out"] == pytest.approx(second.affine.r2_held_out)
    for key in ("residual_fve", "affine_fve", "fve", "redundancy_mapped_mean_max_cos"):
        assert key in second.metrics, key
    for key in ("multi_tf_delta_ce", "multi_online_delta_ce", "multi_tf_ce_loss_recovered"):
        assert key in stack.metrics, key
    assert (tmp_path / "calibration" / "manifest.json").is_file()

    plain = dict(data, stack={**data["stack"], "residualize": False, "name": "plain"})
    plain_dir = run_training(config_from_dict(plain), tmp_path / "plain", progress=False).stack_dir
    assert main(["eval", "--stack", str(plain_dir), "--compare", str(result.stack_dir), "--max-tokens", "128",
                 "--ce-windows", "4"]) == 0
    table = capsys.readouterr().out
    assert "| metric | plain | smoke |" in table
    assert "| **stage 1: blocks.2.hook_mlp_out** | plain | residual |" in table
    for label in ("FVE on the residual target", "multi-layer ΔCE, online",
                  "redundancy vs previous stage mapped through A"):
        assert label in table, label
    mapped = next(line for line in table.splitlines() if "mapped through A" in line)
    assert "–" not in mapped  # the plain stack is measured with the ReSAE's maps too
    assert main(["eval", "--stack", str(plain_dir), "--compare", str(result.stack_dir), "--recorded"]) == 0
    assert capsys.readouterr().out.strip() == table.strip()


def test_per_stage_sparsity_coefficients_reach_each_stage_and_keep_old_fingerprints():
    data = _small("sa_gsae")
    plain = config_from_dict(data)
    assert "sparsity_coefficients" not in plain.to_dict()["sae"]  # old configs keep their fingerprint
    data["sae"]["sparsity_coefficients"] = [0.5, 3.0]
    cfg = config_from_dict(data)
    assert [cfg.sae.sae_config(64, i).sparsity_coefficient for i in range(2)] == [0.5, 3.0]
    assert cfg.fingerprint() != plain.fingerprint()
    data["sae"]["sparsity_coefficients"] = [1.0]
    with pytest.raises(ValueError, match="one value >= 0 per hookpoint"):
        config_from_dict(data)


def test_training_history_observes_without_changing_the_run(tmp_path):
    plain = _small("sa_gsae")
    observed = _small("sa_gsae")
    observed["training"].update(history_every=2, history_windows=[256, 1024, 100_000])  # 512 tokens apart
    with_history = run_training(config_from_dict(observed), tmp_path / "history", progress=False)
    without = run_training(config_from_dict(plain), tmp_path / "plain", progress=False)
    for a, b in zip(read_stack(with_history.stack_dir).stages, read_stack(without.stack_dir).stages, strict=True):
        for name, tensor in a.sae.state_dict().items():
            assert torch.equal(tensor, b.sae.state_dict()[name]), name  # observation only
    assert "history" not in without.report["stages"][0]
    assert "history_every" not in config_from_dict(plain).to_dict()["training"]  # old fingerprints unchanged
    history = with_history.report["stages"][0]["history"]
    steps = with_history.report["steps"]
    assert [h["step"] for h in history] == list(range(2, steps + 1, 2))
    assert history[-1]["tokens"] == steps * observed["training"]["batch_size"]
    first, last = history[0], history[-1]
    assert first["dead_over_1024"] is None and last["dead_over_1024"] is not None  # only once 1024 tokens are seen
    assert last["dead_over_100000"] is None  # longer than the run
    assert 0.0 <= last["dead_over_256"] <= 1.0 and last["l0"] > 0
    # a latent dead over 1024 tokens is also dead over 256
    assert all(h["dead_over_256"] >= h["dead_over_1024"] for h in history if h["dead_over_1024"] is not None)


def test_history_settings_are_checked():
    bad = _small()
    bad["training"]["history_every"] = -1
    with pytest.raises(ValueError, match="history_every must be >= 0"):
        config_from_dict(bad)
    bad["training"].update(history_every=2, history_windows=[0])
    with pytest.raises(ValueError, match="history_windows needs at least one window >= 1"):
        config_from_dict(bad)
