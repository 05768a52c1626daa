"""Meta-SAE regularised training: the penalty's gradient flow and its λ₂ scale (the paper's, at any d_in), the
retired `lambda` key, the alternating schedule, unit decoder rows, checkpoints, and the meta-SAE in the stack
(written, read back, served, refused when tampered with)."""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

import pytest
import torch

from core.sae.base import SAEConfig
from core.sae.registry import ARCHITECTURES, build_sae
from core.stack.manifest import StackError
from core.stack.meta_sae import meta_latents
from core.stack.reader import read_stack
from trainer.report.meta import compare_solo_and_meta
from trainer.training.checkpoint import StageTrainingState, load_checkpoint, save_checkpoint
from trainer.training.config import MetaSAESection, config_from_dict, load_config
from trainer.training.loop import _step_stage
from trainer.training.meta_sae import (
    build_meta_state,
    decomposability,
    fit_meta_sae,
    meta_phase,
    penalty_term,
    penalty_weight,
    reconstruct_rows,
    unit_rows,
)
from trainer.training.optimization import DeadLatentTracker, make_optimizer

CONFIGS = Path(__file__).resolve().parents[3] / "trainer" / "configs"
SMOKE = CONFIGS / "smoke.toml"
D_IN, D_SAE = 16, 64


@pytest.fixture
def one_thread():
    """Tiny tensors: extra intra-op threads only add contention on a busy machine (tens of times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def primary_state(architecture: str = "topk") -> StageTrainingState:
    sae = build_sae(SAEConfig(architecture=architecture, d_in=D_IN, d_sae=D_SAE, k=4, sparsity_coefficient=0.01))
    return StageTrainingState(sae, make_optimizer(sae, 1e-2), DeadLatentTracker(D_SAE, 10_000))


def distances(W_dec: torch.Tensor, meta: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return (unit_rows(W_dec) - reconstruct_rows(meta, unit_rows(W_dec))).norm(dim=1)  # (H,)


def test_the_penalty_pushes_rows_away_from_their_meta_reconstruction_and_leaves_the_meta_sae_alone(one_thread):
    section = MetaSAESection(width=8, k=2, lambda_per_dim=1.0, sigma2=1.0)
    state = primary_state()
    meta = build_meta_state(section, state.sae.W_dec, 1e-2)
    meta_phase(state.sae.W_dec, meta, 100)  # a critic that reconstructs the rows somewhat
    meta.optimizer.zero_grad(set_to_none=True)
    frozen = {k: v.clone() for k, v in meta.sae.state_dict().items()}
    before = distances(state.sae.W_dec, meta.sae)
    with torch.no_grad():
        target = reconstruct_rows(meta.sae, unit_rows(state.sae.W_dec))
        p = torch.exp(-(state.sae.W_dec - target).pow(2).sum(dim=1))

    term = penalty_term(meta, section)(state.sae)
    term.backward()
    assert all(param.grad is None for param in meta.sae.parameters())  # nothing flows into the critic
    expected = -2 * D_IN * p[:, None] * (state.sae.W_dec.detach() - target) / D_SAE  # d·∂ mean p / ∂d_i, §D.2
    torch.testing.assert_close(state.sae.W_dec.grad, expected)

    optimizer = torch.optim.SGD([state.sae.W_dec], lr=0.5)  # a step on the penalty alone
    state.sae.remove_parallel_decoder_grad_()
    optimizer.step()
    state.sae.normalize_decoder_()
    after = distances(state.sae.W_dec, meta.sae)
    assert float(after.mean()) > float(before.mean()) + 1e-3
    assert float((after > before).float().mean()) > 0.9
    for name, value in meta.sae.state_dict().items():
        assert torch.equal(value, frozen[name]), name
    torch.testing.assert_close(state.sae.W_dec.norm(dim=1), torch.ones(D_SAE))


def copies(sae: torch.nn.Module, n: int, *, rows_are_inputs: bool) -> dict[str, torch.Tensor]:
    """A state_dict for the same SAE on inputs [x, …, x] (n copies, d_in → n·d_in) that is the same problem in
    per-dimension terms: decoder rows [w, …, w]/√n stay unit. For the primary (inputs x with E‖x‖² = d_in, so
    [x, …, x] keeps the per-dimension scale) codes grow by √n and x̂ becomes [x̂, …, x̂]; for the meta-SAE (inputs
    unit rows [d, …, d]/√n) codes are unchanged and its reconstruction is [Ŵ, …, Ŵ]/√n."""
    state = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    root = n ** 0.5
    state["W_enc"] = torch.cat([state["W_enc"]] * n, dim=0) / root  # (n·d, H)
    state["W_dec"] = torch.cat([state["W_dec"]] * n, dim=1) / root  # (H, n·d)
    state["b_dec"] = torch.cat([state["b_dec"]] * n) / (root if rows_are_inputs else 1)
    state["b_enc"] = state["b_enc"] * (1 if rows_are_inputs else root)
    return state


def gradient_norms(sae: torch.nn.Module, meta: StageTrainingState, section: MetaSAESection, x: torch.Tensor,
                   weight: float | None = None) -> tuple[float, float]:
    """(‖∂ reconstruction/∂W_dec‖, ‖∂ penalty/∂W_dec‖); `weight` replaces d_in·λ₂ (the retired scale: λ alone)."""
    grads = []
    for loss in (lambda: sae(x).losses["mse"],
                 lambda: (penalty_term(meta, section)(sae) if weight is None else
                          weight * decomposability(sae.W_dec, meta.sae, section.sigma2))):
        sae.zero_grad(set_to_none=True)
        loss().backward()
        grads.append(float(sae.W_dec.grad.norm()))
    return grads[0], grads[1]


@pytest.mark.parametrize("n", [2, 5])
def test_lambda_per_dim_weighs_the_penalty_against_reconstruction_alike_at_every_d_in(n: int, one_thread):
    """The same per-dimension problem at d_in and n·d_in: at λ₂ = 0.3 the penalty's decoder gradient relative to
    the reconstruction's is the same (the retired scale, λ alone, would weigh it n times less), and it is the
    paper's ratio, ‖∂ λ₂·mean p‖ / ‖∂ mean_{tokens,dims}(x − x̂)²‖, at both widths."""
    section = MetaSAESection(width=8, k=2, lambda_per_dim=0.3, sigma2=1.0)
    small = primary_state().sae
    meta_small = build_meta_state(section, small.W_dec, 1e-2)
    meta_phase(small.W_dec, meta_small, 50)  # a critic with p_i well away from 0 and 1
    meta_small.sae.eval()
    x = torch.randn(64, D_IN)  # E‖x‖² = d_in, as training scales it
    small.init_b_dec_(x)

    big = build_sae(SAEConfig(architecture="topk", d_in=n * D_IN, d_sae=D_SAE, k=4))
    big.load_state_dict(copies(small, n, rows_are_inputs=False))
    meta_big = build_meta_state(section, big.W_dec, 1e-2)
    meta_big.sae.load_state_dict(copies(meta_small.sae, n, rows_are_inputs=True))
    meta_big.sae.eval()
    x_big = torch.cat([x] * n, dim=1)  # (N, n·d_in)
    torch.testing.assert_close(decomposability(big.W_dec, meta_big.sae, 1.0),
                               decomposability(small.W_dec, meta_small.sae, 1.0))  # same p_i
    assert 0.05 < float(decomposability(small.W_dec, meta_small.sae, 1.0).detach()) < 0.95

    ratios = {}
    for d_in, sae, meta, data in ((D_IN, small, meta_small, x), (n * D_IN, big, meta_big, x_big)):
        rec, pen = gradient_norms(sae, meta, section, data)
        ratios[d_in] = pen / rec
        assert penalty_weight(section, d_in) == pytest.approx(0.3 * d_in)
        _, pen_paper = gradient_norms(sae, meta, section, data, weight=0.3)  # λ₂·mean p, also the retired scale
        rec_paper = rec / d_in  # ∂ of the paper's per-dimension mean: mean_{tokens,dims} = ours / d_in
        assert pen / rec == pytest.approx(pen_paper / rec_paper, rel=1e-5)
        ratios[f"old {d_in}"] = pen_paper / rec  # `lambda = 0.3` against our summed loss
    assert ratios[n * D_IN] == pytest.approx(ratios[D_IN], rel=1e-4)
    assert ratios[f"old {n * D_IN}"] == pytest.approx(ratios[f"old {D_IN}"] / n, rel=1e-4)


def test_the_retired_lambda_key_is_refused_with_how_to_convert_it(tmp_path: Path):
    hookpoints = {"hookpoints": ["blocks.1.hook_resid_post"]}
    for key in ("lambda", "lambda_"):  # as a TOML file spells it, and as a stored run's config.to_dict() did
        with pytest.raises(ValueError, match=f"meta_sae.{key} is retired") as caught:
            config_from_dict({"stack": hookpoints, "meta_sae": {"width": 8, "k": 2, key: 0.3}})
        message = str(caught.value)
        assert "lambda_per_dim = lambda / d_in" in message and "multiply by 1/d_in" in message
        assert "becomes lambda_per_dim = 0.00046875" in message  # 0.3 / 640, Gemma 3 270M's width
        assert message.endswith("for the paper's setting, lambda_per_dim = 0.3")
    old = tmp_path / "old.toml"
    old.write_text('[stack]\nhookpoints = ["blocks.1.hook_resid_post"]\n[meta_sae]\nlambda = 0.3\n')
    with pytest.raises(ValueError, match=r"old\.toml: meta_sae\.lambda is retired"):
        load_config(old)


def test_shipped_meta_configs_are_on_the_paper_scale():
    for path in sorted(CONFIGS.rglob("*.toml")):
        cfg = load_config(path)  # none uses the retired key
        if cfg.meta_sae is not None:
            assert cfg.meta_sae.lambda_per_dim == 0.3, path  # the paper's best λ₂, moved there on purpose
    assert load_config(CONFIGS / "meta" / "meta.toml").meta_sae is not None


def test_decomposability_is_high_for_rows_the_meta_sae_reconstructs(one_thread):
    section = MetaSAESection(width=8, k=2, lambda_per_dim=0.3)
    atoms = torch.nn.functional.normalize(torch.randn(8, D_IN), dim=1)
    pairs = torch.nn.functional.normalize(atoms[torch.randint(0, 8, (D_SAE,))] + atoms[torch.randint(0, 8, (D_SAE,))],
                                          dim=1)  # (H, d): every row a sum of two meta-directions
    meta, metrics = fit_meta_sae(pairs, section, steps=400, lr=1e-2)
    assert metrics["meta_fve"] > 0.8 and metrics["meta_l0"] == pytest.approx(2.0)
    assert float(decomposability(pairs, meta, 1.0)) > 0.8
    assert metrics["meta_penalty"] == pytest.approx(0.3 * D_IN * metrics["meta_mean_p"])  # as it enters our loss
    random_rows = torch.nn.functional.normalize(torch.randn(D_SAE, D_IN), dim=1)
    assert float(decomposability(random_rows, meta, 1.0)) < float(decomposability(pairs, meta, 1.0))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_phases_alternate_and_rows_stay_unit_norm(architecture: str, one_thread):
    data = {"stack": {"hookpoints": ["blocks.1.hook_resid_post"]}, "training": {"warmup_steps": 0},
            "meta_sae": {"width": 8, "k": 2, "lambda_per_dim": 10.0 / D_IN, "primary_steps": 3, "meta_steps": 2}}
    cfg = config_from_dict(data)
    state = primary_state(architecture)
    state.meta = build_meta_state(cfg.meta_sae, state.sae.W_dec, 1e-2)
    x = torch.randn(32, D_IN)
    meta_moved, meta_steps = [], []
    for step in range(9):
        before = state.meta.sae.W_dec.clone()
        log = _step_stage(cfg, state, x, step, 9)
        assert log["meta_penalty"] > 0
        meta_moved.append(not torch.equal(before, state.meta.sae.W_dec))
        adam = state.meta.optimizer.state_dict()["state"]
        meta_steps.append(int(adam[0]["step"]) if adam else 0)
        torch.testing.assert_close(state.sae.W_dec.norm(dim=1), torch.ones(D_SAE))
        torch.testing.assert_close(state.meta.sae.W_dec.norm(dim=1), torch.ones(8))
    assert meta_moved == [False, False, True] * 3  # meta phases after primary steps 3, 6 and 9 only
    assert meta_steps == [0, 0, 2, 2, 2, 4, 4, 4, 6]


def test_checkpoints_carry_the_meta_sae(tmp_path: Path, one_thread):
    section = MetaSAESection(width=8, k=2, lambda_per_dim=0.3)
    state = primary_state("batchtopk")
    state.meta = build_meta_state(section, state.sae.W_dec, 1e-2)
    meta_phase(state.sae.W_dec, state.meta, 3)
    save_checkpoint(tmp_path, 7, "fp", [state])
    fresh = primary_state("batchtopk")
    fresh.meta = build_meta_state(section, fresh.sae.W_dec, 1e-2)
    assert load_checkpoint(tmp_path, "fp", [fresh]) == 7
    for name, value in state.meta.sae.state_dict().items():
        assert torch.equal(value, fresh.meta.sae.state_dict()[name]), name
    assert torch.equal(state.meta.optimizer.state_dict()["state"][0]["exp_avg"],
                       fresh.meta.optimizer.state_dict()["state"][0]["exp_avg"])


@pytest.mark.parametrize(("values", "needle"), [
    ({"width": 0, "lambda_per_dim": 0.3}, "meta_sae.width must be an integer >= 1"),
    ({"width": 4, "k": 5, "lambda_per_dim": 0.3}, "meta_sae.k must be <= meta_sae.width"),
    ({"lambda_per_dim": -0.1}, "meta_sae.lambda_per_dim must be a finite number >= 0"),
    ({"lambda_per_dim": 0.3, "sigma2": 0}, "meta_sae.sigma2 must be a finite number > 0"),
    ({"lambda_per_dim": 0.3, "primary_steps": 0}, "meta_sae.primary_steps must be an integer >= 1"),
    ({"lamda_per_dim": 0.3}, r"unknown key\(s\) \['lamda_per_dim'\] in \[meta_sae\]; allowed: k, lambda_per_dim, "),
    ({"width": 8}, "meta_sae.lambda_per_dim is required"),
])
def test_meta_config_errors_name_the_problem(values: dict, needle: str):
    with pytest.raises(ValueError, match=needle):
        config_from_dict({"stack": {"hookpoints": ["blocks.1.hook_resid_post"]}, "meta_sae": values})


def test_configs_without_meta_sae_keep_their_fingerprint():
    plain = config_from_dict({"stack": {"hookpoints": ["blocks.1.hook_resid_post"]}})
    assert plain.meta_sae is None and "meta_sae" not in plain.to_dict()
    meta = config_from_dict({"stack": {"hookpoints": ["blocks.1.hook_resid_post"]},
                             "meta_sae": {"lambda_per_dim": 0.5}})
    assert meta.meta_sae == MetaSAESection(lambda_per_dim=0.5) and meta.fingerprint() != plain.fingerprint()
    assert config_from_dict(meta.to_dict()) == meta  # a stored run's config reads back


def test_solo_and_meta_runs_compare_and_the_meta_sae_round_trips_and_is_verified(tmp_path: Path):
    data = {k: dict(v) for k, v in tomllib.loads(SMOKE.read_text()).items()}
    data["stack"]["hookpoints"] = ["blocks.1.hook_resid_post"]
    data["sae"] = {"architecture": "batchtopk", "expansion_factor": 2, "k": 8}
    data["training"].update(token_budget=2048, checkpoint_every=8, dead_after_tokens=512)
    data["activations"].update(max_tokens=2048, store=str(tmp_path / "store"))
    data["eval"] = {"max_tokens": 256, "ce_windows": 4}
    solo = config_from_dict(data)
    data["meta_sae"] = {"width": 16, "k": 2, "lambda_per_dim": 0.3, "sigma2": 1.0, "primary_steps": 2,
                        "meta_steps": 2}
    joint = config_from_dict(data)
    with pytest.raises(ValueError, match="must share activations"):
        compare_solo_and_meta(solo, config_from_dict({**data, "training": {**data["training"], "lr": 0.1}}), tmp_path)
    [row] = compare_solo_and_meta(solo, joint, tmp_path, post_hoc_steps=20)
    assert row["hookpoint"] == "blocks.1.hook_resid_post" and isinstance(row["mean_abs_phi_change"], float)
    assert row["solo"]["meta_fve"] is None and isinstance(row["meta"]["meta_fve"], float)
    for side in ("solo", "meta"):
        assert row[side]["mean_abs_phi"] > 0 and row[side]["phi_tokens"] == 256
        assert isinstance(row[side]["meta_fve_post_hoc"], float)
    stack_dir = tmp_path / "meta" / "stack"
    report = json.loads((tmp_path / "meta" / "report.json").read_text())

    stage = report["stages"][0]
    assert stage["training"]["meta_penalty"] > 0
    for key in ("mean_abs_phi", "phi_noise_floor", "meta_fve", "meta_penalty", "meta_mean_p"):
        assert isinstance(stage["eval"][key], float), key
    assert stage["eval"]["meta_l0"] == pytest.approx(2.0)  # the serving threshold is calibrated on the rows

    loaded = read_stack(stack_dir).stages[0]
    assert loaded.meta_sae is not None and loaded.meta_sae.d_sae == 16
    record = json.loads((stack_dir / "stack.json").read_text())["stages"][0]["meta_sae"]
    assert (record["width"], record["k"], record["metrics"]["meta_fve"]) == (16, 2, stage["eval"]["meta_fve"])
    served = [meta_latents(loaded, f) for f in range(loaded.sae.d_sae)]
    assert sum(len(indices) for indices, _ in served) == 2 * loaded.sae.d_sae  # mean L0 = k over the rows
    for f, (indices, values) in enumerate(served):
        assert bool((values > 0).all()) and bool((values[:-1] >= values[1:]).all())
        z = loaded.meta_sae.encode(torch.nn.functional.normalize(loaded.sae.W_dec[f], dim=0)[None])[0]
        assert torch.equal(z[indices], values) and int((z != 0).sum()) == len(indices)
    with pytest.raises(IndexError):
        meta_latents(loaded, loaded.sae.d_sae)

    meta_file = stack_dir / record["file"]
    meta_file.write_bytes(meta_file.read_bytes()[:-4] + b"\x00\x00\x80\x3f")  # one weight changed
    with pytest.raises(StackError, match="corrupt"):
        read_stack(stack_dir)
    manifest = json.loads((stack_dir / "stack.json").read_text())  # a forger fixes the hash ...
    manifest["files"][record["file"]]["sha256"] = hashlib.sha256(meta_file.read_bytes()).hexdigest()
    manifest["stages"][0]["meta_sae"]["width"] = 32  # ... but the record no longer matches its config
    (stack_dir / "stack.json").write_text(json.dumps(manifest))
    with pytest.raises(StackError, match="meta_sae.sae_config"):
        read_stack(stack_dir)
